#!/usr/bin/env bash
# The GPU path in under 5 minutes on one CUDA GPU: the quickstart on CUDA, then
# train-student against a bare CUDA loop and the eager ceiling, and soft-targets against a
# bare teacher loop (benchmarks/bench_gpu.py). Needs kdcli installed with a CUDA build of
# torch. Run from the repository root: benchmarks/gpu_check.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python - <<'PY'
import torch
if not torch.cuda.is_available():
    raise SystemExit("gpu_check: no CUDA GPU visible to torch")
print("GPU:", torch.cuda.get_device_name(), "| torch", torch.__version__,
      "| bf16:", torch.cuda.is_bf16_supported())
PY
work=$(mktemp -d)
cd "$work"
start=$(date +%s)
"$root/examples/quickstart.sh" --device cuda
echo "quickstart on CUDA: $(( $(date +%s) - start )) s"
cd "$root/benchmarks"
python bench_gpu.py
echo "gpu_check: $(( $(date +%s) - start )) s in all"
