#!/usr/bin/env bash
# The GPU table on a fresh NVIDIA machine, in one run: DeiT-Ti/S/B inference at batch 256 and the
# hard-distillation training step at batch 256, bf16, deit (JAX on CUDA, fused cuDNN attention)
# against timm (AMP bf16 eager and torch.compile), JSON and markdown into one folder.
#
#   bash bench/gpu.sh [OUT]            # installs into .venv-gpu, then measures (about 8 minutes)
#   bash bench/gpu.sh --dry-run [OUT]  # on any machine: prints the install, runs the same script
#                                      # on CPU with a tiny model and no reference (seconds)
set -euo pipefail
cd "$(dirname "$0")/.."
dry=0
if [[ "${1:-}" == "--dry-run" ]]; then dry=1; shift; fi
out=${1:-bench/results/gpu}
mkdir -p "$out"

# The CUDA plugin must match the jaxlib that `pip install -e .` resolves (jax 0.10.x on Python 3.11).
install=(
  "python3 -m venv .venv-gpu"
  ". .venv-gpu/bin/activate"
  "pip install -e .[test]"  # torch==2.14.1 from PyPI is its CUDA build on Linux x86_64
  "pip install jax-cuda12-plugin[with-cuda]==\$(python -c 'import jaxlib; print(jaxlib.__version__)')"
)
ti=deit_tiny_distilled_patch16_224
s=deit_small_distilled_patch16_224
b=deit_base_distilled_patch16_224
measure=(
  python bench/speed.py --models "$ti" "$s" "$b" --batches 256 --dtypes bfloat16
  --train-models "$ti" --train-batch 256 --compile-batches 256 --rounds 3 --min-seconds 0.3
  --pipeline-workers --torch-device cuda --out "$out/speed.json" --markdown "$out/speed.md"
)

if [[ $dry == 1 ]]; then
  printf '+ %s\n' "${install[@]}"
  echo "+ ${measure[*]}"
  python=${PYTHON:-python}
  # The same script end to end on CPU, small enough to finish in seconds.
  "$python" bench/speed.py --models deit_test_distilled_patch4_32 --batches 2 --dtypes bfloat16 \
    --train-models deit_test_distilled_patch4_32 --train-batch 4 --no-timm --rounds 1 \
    --min-seconds 0 --compile-batches --pipeline-workers --out "$out/dry_run.json" \
    --markdown "$out/dry_run.md"
  exit 0
fi

for step in "${install[@]}"; do
  echo "+ $step"
  eval "$step"
done
python - <<'PY'
import jax, torch
assert jax.default_backend() == "gpu", f"JAX runs on {jax.default_backend()}, not the GPU"
assert torch.cuda.is_available(), "torch sees no CUDA device"
print("JAX", jax.__version__, jax.devices(), "| torch", torch.__version__, torch.cuda.get_device_name())
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv" || true
start=$(date +%s)
"${measure[@]}"
echo "measured in $(( $(date +%s) - start )) s; tables in $out/speed.md"
