"""The GPU check: the transformers engine on CUDA through firm-serve, and the RL workers' tiny
pipelines on CUDA in bf16, on a bare CUDA box that has torch and transformers but no network.

Two steps. Where a package registry is reachable, gather what else the check needs as wheels
(kept under 64 MiB so the copy to an offline box stays small; several Python versions for the one
compiled package):

    python bench/gpu_check.py prepare               # -> build/gpu-wheels

Copy the clone, with build/gpu-wheels, to the GPU box and run (a few minutes):

    python bench/gpu_check.py run

It installs the wheels into build/gpu-check-env (a virtual environment that sees the box's own
torch and transformers), starts `firm-serve --tiny --engine transformers --device cuda`, scores
the four routes over HTTP, then runs one training step of `firm-rollout --tiny` for each task
against it (the workers pick bf16 on CUDA). It prints one line per check and `N passed, N failed`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / "build" / "gpu-wheels"
ENV = ROOT / "build" / "gpu-check-env"
LIMIT_BYTES = 64 * 1024 * 1024
# What a CUDA box with torch and transformers lacks for the server, the client and the RL workers.
CARRIED = (
    "pydantic", "annotated-types", "typing-inspection", "typing-extensions", "pydantic-settings", "python-dotenv",
    "fastapi", "annotated-doc", "starlette", "anyio", "sniffio", "idna", "httpx", "httpcore", "h11", "certifi",
    "uvicorn", "click", "prometheus-client", "tqdm", "diffusers", "peft", "accelerate", "importlib-metadata", "zipp",
    "requests", "urllib3", "charset-normalizer",
)  # fmt: skip
COMPILED = ("pydantic-core", "psutil")  # one wheel per Python version (psutil's is abi3: one for all)
PYTHONS = ("3.10", "3.11", "3.12", "3.13")
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
ON_THE_BOX = re.compile(r"(torch|torchvision|transformers|tokenizers|numpy|pillow)\b", re.IGNORECASE)


def _pip(*args: str, python: str = sys.executable) -> None:
    subprocess.run([python, "-m", "pip", *args], check=True)


def prepare(wheels: Path) -> None:
    """Download the pinned wheels (the versions installed here, which the suite passes with)."""
    wheels.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in CARRIED]
    _pip("download", "--quiet", "--no-deps", "--dest", str(wheels), *pins)
    for version in PYTHONS:
        compiled = [f"{name}=={importlib.metadata.version(name)}" for name in COMPILED]
        platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
        _pip("download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", version, *platforms,
             "--dest", str(wheels), *compiled)  # fmt: skip
    size = sum(f.stat().st_size for f in wheels.iterdir())
    print(f"{len(list(wheels.iterdir()))} wheels, {size / 2**20:.1f} MiB in {wheels}")
    if size > LIMIT_BYTES:
        sys.exit(f"the wheels take {size / 2**20:.1f} MiB, over the 64 MiB this check keeps its copy under")


def _requirements() -> list[str]:
    """The project's requirements for the server, the client and the RL workers, less what the box has."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = project["dependencies"] + extras["server"] + extras["rl"]
    # extras dropped: uvicorn's [standard] speed-ups are compiled, and plain uvicorn serves as well
    return [
        re.sub(r"\[.*?\]", "", r) for r in wanted if not r.startswith("firm-reward-server") and not ON_THE_BOX.match(r)
    ]


def _install(wheels: Path) -> str:
    if not (ENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(ENV)], check=True)
    python = str(ENV / "bin" / "python")
    _pip("install", "--quiet", "--no-index", "--find-links", str(wheels), *_requirements(), python=python)
    return python


class Checks:
    def __init__(self) -> None:
        self.passed, self.failed = 0, 0

    def run(self, name: str, check: Callable[[], str]) -> None:
        started = time.monotonic()
        try:
            detail = check()
        except (AssertionError, OSError, RuntimeError, subprocess.SubprocessError, ValueError, KeyError) as exc:
            self.failed += 1
            print(f"FAIL {name} ({time.monotonic() - started:.0f} s): {type(exc).__name__}: {exc}", flush=True)
            return
        self.passed += 1
        print(f"PASS {name} ({time.monotonic() - started:.0f} s): {detail}", flush=True)


def _score_routes(url: str) -> str:
    import httpx

    from tests.support import b64

    client = httpx.Client(base_url=url, timeout=120)
    models = client.get("/v1/models").json()["models"]
    assert {m["engine"] for m in models} == {"transformers"}, models
    edit = {"source": b64("blue"), "edited": b64("red"), "instruction": "Make the square red."}
    group = {"source": b64("blue"), "instruction": "Make the square red.", "candidates": [b64("red"), b64("blue")]}
    gen = {"image": b64("red"), "prompt": "a red square"}
    calls = {
        "/v1/edit/score": {"items": [edit]},
        "/v1/edit/score_group": group,
        "/v1/gen/score": {"items": [gen]},
        "/v1/gen/score_group": {"prompt": "a red square", "images": [b64("red"), b64("green")]},
    }
    for route, body in calls.items():
        response = client.post(route, json={**body, "score_mode": "expected"})
        assert response.status_code == 200, (route, response.text[:500])
        for result in response.json()["results"]:
            assert result["error"] is None and result["reward"] is not None, (route, result)
    return "four routes scored, no item failed"


def _firm_serve_check(python: str, cache: Path, env: dict[str, str], device: str) -> Callable[[], str]:
    """`firm-serve check` on the box: the device and its memory as the server sees them, nothing loaded."""

    def check() -> str:
        cmd = [python, "-m", "server.cli", "check", "--tiny", "--cache-dir", str(cache), "--device", device]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        lines = [line for line in done.stdout.splitlines() if " device " in line or " memory " in line]
        return " | ".join(" ".join(line.split()[1:]) for line in lines)

    return check


def _rollout(
    python: str, url: str, task: str, cache: Path, env: dict[str, str], device: str, algorithm: str = "grpo"
) -> Callable[[], str]:
    def check() -> str:
        from bench.prompt_files import Prompt, write_prompt_file
        from tests.support import picture

        prompt = Prompt("a red square on a grey background", picture("blue"), "Make the square red.")
        prompts = write_prompt_file(cache / f"prompts-{task}", [prompt])
        out = cache / f"rollout-{task}-{algorithm}"
        cmd = [python, "-m", "rl_workers.cli", "--tiny", "--task", task, "--cache-dir", str(cache), "--reward-url", url,
               "--algorithm", algorithm,
               "--prompts", str(prompts), "--output-dir", str(out),
               "--resolution", "64", "--group-size", "4", "--groups-per-step", "1", "--sample-steps", "2",
               "--steps", "1", "--no-progress", "--no-tensorboard", "--device", device]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        (line,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return f"one step, reward/mean {line['reward/mean']:.3f}"

    return check


def run(wheels: Path) -> None:
    """Install, then go on in the check's environment (the box's own Python may lack httpx)."""
    started = time.monotonic()
    python = _install(wheels)
    print(f"installed from {wheels} in {time.monotonic() - started:.0f} s", flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    os.execve(python, [python, __file__, "checks"], env)


def checks(device: str) -> None:
    """The checks, in the check's environment. `--device cpu` runs them here, as a rehearsal."""
    started = time.monotonic()
    python, env = sys.executable, dict(os.environ)
    from rl_workers.tasks import ROLLOUT_TASKS
    from tests.support import running_server

    checks = Checks()
    cache = ROOT / "build" / "gpu-check-cache"
    if device == "cuda":
        checks.run("cuda", lambda: subprocess.run(
            [python, "-c", "import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name(0))"],
            check=True, capture_output=True, text=True, env=env).stdout.strip())  # fmt: skip
    flags = ("--engine", "transformers", "--device", device, "--log-level", "warning")
    algorithms = ("grpo", "nft")
    checks.run(f"firm-serve check --tiny --device {device}", _firm_serve_check(python, cache, env, device))
    try:
        with running_server(cache, *flags, python=python, env=env, timeout=300) as url:
            checks.run(f"firm-serve, transformers engine on {device}", lambda: _score_routes(url))
            for task in ROLLOUT_TASKS:
                for algorithm in algorithms:
                    name = f"firm-rollout --tiny --task {task} --algorithm {algorithm} on {device} (bf16 on CUDA)"
                    checks.run(name, _rollout(python, url, task, cache, env, device, algorithm))
    except RuntimeError as exc:  # the server did not start: every check that needed it fails
        checks.failed += 1 + len(ROLLOUT_TASKS) * len(algorithms)
        print(f"FAIL firm-serve did not start: {exc}", flush=True)
    print(f"GPU check: {time.monotonic() - started:.0f} s after the install")
    print(f"{checks.passed} passed, {checks.failed} failed")
    sys.exit(1 if checks.failed else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("prepare", "run", "checks"), help="checks: run's second half")
    parser.add_argument("--wheels", type=Path, default=WHEELS, help="the wheel folder (default: build/gpu-wheels)")
    parser.add_argument("--device", default="cuda", help="checks only: cpu rehearses them without a GPU")
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.wheels)
    elif args.step == "run":
        run(args.wheels)
    else:
        checks(args.device)


if __name__ == "__main__":
    main()
