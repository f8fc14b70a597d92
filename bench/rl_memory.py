"""Peak memory of each phase of a rollout worker's training step, for a given model and settings.

Loads the generator (a hub id, a folder, or --tiny), attaches LoRA, and runs one step by phases:
sampling (text embedding, SDE sampling, decoding), the wait for rewards (what the worker holds
while the server scores), and the update (recomputed log-probabilities, backward, optimizer). A
stand-in critic answers at once with spread rewards, so no reward server is needed and every
sample trains. On a GPU it prints the peak allocated accelerator memory of each phase; on a CPU
it prints the process's resident memory after each phase and its peak so far (what Linux reports).

    python bench/rl_memory.py --tiny --task gen
    python bench/rl_memory.py --task edit --resolution 512 --group-size 12 --sample-steps 6
    python bench/rl_memory.py --task gen --no-gradient-checkpointing --train-batch-size 8
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image

from bench.prompt_files import Prompt, write_prompt_file
from rl_workers.generators import load_generator
from rl_workers.generators.base import Condition
from rl_workers.prompts import load_conditions
from rl_workers.rewards import GroupRewards
from rl_workers.settings import RolloutSettings
from rl_workers.tasks import FORMER_TASK_NAMES, ROLLOUT_TASKS
from rl_workers.worker import RolloutWorker, Timings

GIB = 2**30


class SpreadRewards:
    """Stands in for the reward server: rewards 0 .. 1 across each group, answered at once."""

    def submit(self, condition: Condition, images: list[Any], source: Any = None) -> Any:
        n = len(images)
        rewards = GroupRewards([i / max(n - 1, 1) for i in range(n)], {})
        return type("Done", (), {"result": lambda _: rewards})()


def _rss_gib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / GIB


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux reports KiB


def phase(name: str, device: torch.device, work: Callable[[], Any]) -> Any:
    """Run `work`, then print its time and memory figures."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    result = work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak, held = torch.cuda.max_memory_allocated(device) / GIB, torch.cuda.memory_allocated(device) / GIB
        figures = f"peak {peak:7.2f} GiB   held after {held:7.2f} GiB"
    else:
        figures = f"resident after {_rss_gib():7.2f} GiB   process peak so far {_peak_rss_gib():7.2f} GiB"
    print(f"{name:<14} {time.perf_counter() - started:8.1f} s   {figures}", flush=True)
    return result


def _prompts(folder: Path, side: int) -> Path:
    """The one prompt of the run, in a file every task reads (a source `side` wide, 4:3, for an edit)."""
    source = Image.new("RGB", (side, side * 3 // 4), (40, 70, 220))
    prompt = Prompt("a red fox in the snow, photograph", source, "Make the background red.", id="bench")
    return write_prompt_file(folder, [prompt])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--task", choices=[*ROLLOUT_TASKS, *FORMER_TASK_NAMES], default=RolloutSettings.model_fields["task"].default
    )
    parser.add_argument("--tiny", action="store_true", help="tiny random pipelines built locally")
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--resolution", type=int, default=None, help="default 64 with --tiny, else 512")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--sample-steps", type=int, default=None, help="default 2 with --tiny, else 10")
    parser.add_argument("--train-batch-size", type=int, default=None)
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--offload-text-encoders", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--cfg-grad", choices=("cond", "both"), default="cond")
    parser.add_argument("--kl-beta", type=float, default=0.04)
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)

    tiny = args.tiny
    resolution = args.resolution or (64 if tiny else 512)
    with tempfile.TemporaryDirectory() as tmp:
        fields: dict[str, Any] = {
            "task": args.task, "tiny": tiny, "model": args.model, "device": args.device,
            "prompts": _prompts(Path(tmp) / "prompts", resolution), "output_dir": Path(tmp) / "out",
            "resolution": resolution, "group_size": args.group_size,
            "groups_per_step": 1, "sample_steps": args.sample_steps or (2 if tiny else 10),
            "train_batch_size": args.train_batch_size, "gradient_checkpointing": args.gradient_checkpointing,
            "offload_text_encoders": args.offload_text_encoders, "cfg_grad": args.cfg_grad, "kl_beta": args.kl_beta,
            "updates_per_step": 1, "max_sequence_length": 16 if tiny else 256, "progress": False, "tensorboard": False,
        }  # fmt: skip
        if tiny:
            fields |= {"source_vae_side": 64, "source_vl_side": 64}
        if args.cache_dir:
            fields["cache_dir"] = args.cache_dir
        settings = RolloutSettings(**{k: v for k, v in fields.items() if v is not None})
        run(settings)


def run(settings: RolloutSettings) -> None:
    from rl_workers.generators import resolve_device

    device = resolve_device(settings.device)
    where = "GPU" if device.type == "cuda" else "CPU (accelerator figures need a GPU)"
    print(f"{settings.task}: {'tiny pipeline' if settings.tiny else settings.model_id} on {device}, {where}")
    checkpointing = settings.gradient_checkpointing
    print(
        f"G={settings.group_size} steps={settings.sample_steps} resolution={settings.resolution} "
        f"train batch={settings.batch_size} "
        f"checkpointing={checkpointing if checkpointing is not None else device.type == 'cuda'} "
        f"offload text encoders={settings.offload_text_encoders and device.type == 'cuda'} "
        f"cfg-grad={settings.cfg_grad} kl-beta={settings.kl_beta}"
    )
    generator = phase("load", device, lambda: load_generator(settings, device))
    (condition,) = load_conditions(settings.prompts, settings.task)
    worker = RolloutWorker(settings, generator, SpreadRewards(), iter([condition] * 8))  # type: ignore[arg-type]
    timings = Timings()
    rollouts = phase("sampling", device, lambda: worker.sample_groups([condition], timings))
    phase("scoring wait", device, lambda: [r.pending.result() for r in rollouts if r.pending is not None])
    stats = phase("update", device, lambda: worker.update(rollouts))
    print(f"trained {stats.samples} samples in {stats.optimizer_steps} optimizer step(s)")


if __name__ == "__main__":
    main()
