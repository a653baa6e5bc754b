#!/usr/bin/env bash
# GPU benchmark, one short run (~3-5 min on one H100): nnU-Net's own train step vs our DP step (loop, bk, auto) vs
# opacus hooks, on the committed Dataset902 plans (2d, 3d_fullres) and nnU-Net's 2d plan for 256x256 (2d_256), at the
# plans' batch sizes, bf16 autocast for the DP step, nnU-Net's autocast + GradScaler for its own step.
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh      # writes $OUT/bench_gpu.json and $OUT/bench_gpu.log
#
# Uses `python` on PATH. Installs nothing beyond `pip install -e .`; on a machine without a package index, where that
# fails, it runs from the checkout (PYTHONPATH) and takes pure-Python dependencies (nnunetv2,
# dynamic_network_architectures, batchgenerators, acvl_utils, opacus) from ./.gpu_site if that folder was carried.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 nnUNet_compile=f
PY=$(command -v python || command -v python3)
if [ -d .gpu_site ]; then export PYTHONPATH="$PWD/.gpu_site${PYTHONPATH:+:$PYTHONPATH}"; fi
if ! "$PY" -c "import nnunet_dp.tools.benchmark" 2>/dev/null; then
  PIP_RETRIES=0 PIP_TIMEOUT=10 "$PY" -m pip install -q -e . \
    || { echo "pip install -e . failed; running from the checkout"; export PYTHONPATH="$PWD:${PYTHONPATH:-}"; }
fi
"$PY" - <<'EOF'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print("torch", torch.__version__, "on", torch.cuda.get_device_name(), "bf16:", torch.cuda.is_bf16_supported())
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
set -o pipefail
timeout "${BENCH_TIMEOUT:-420}" "$PY" -m nnunet_dp.tools.benchmark -device cuda --rounds 5 --warmup 2 \
  --json "$OUT/bench_gpu.json" "$@" 2>&1 | tee "$OUT/bench_gpu.log"
