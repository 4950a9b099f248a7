#!/usr/bin/env bash
# The GPU page in one run of about 6 minutes: `bench/gpu.py` table (deit against timm eager and
# torch.compile), compile (the training step's first compile, cold and cached) and loop (`deit
# train` on synthetic input against its bare step), each under its own timeout and log, then the
# report, bench/results/gpu_<gpu>.{json,md}.
#
#   bash bench/gpu.sh --wheels          # on a machine with network, once: the wheels a GPU
#                                       # machine without network lacks, into .whl/ (ignored)
#   bash bench/gpu.sh [OUT]             # on the GPU machine; logs and JSON in OUT
#   bash bench/gpu.sh --dry-run [OUT]   # anywhere: the same stages on the CPU, tiny model, no torch
#   DEIT_GPU_STAGES="table loop" bash bench/gpu.sh   # only these stages
#
# Which Python: $PYTHON, else python3. When it already has JAX on CUDA, torch with CUDA and timm
# (a cluster node, a rented GPU box), it is used as it is, with the project's other dependencies
# installed from .whl/ into a folder on PYTHONPATH, without network. Otherwise a venv is made
# from the network (.venv-gpu, jax[cuda13] + the test extra).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
wheels=(grain==0.2.18 array-record==0.8.6 tyro tensorboardX docstring-parser typeguard shtab portpicker simplejpeg)

if [[ "${1:-}" == "--wheels" ]]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
  exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${wheels[@]}"
fi
dry=0
if [[ "${1:-}" == "--dry-run" ]]; then dry=1; shift; fi
out=$(realpath -m "${1:-$root/bench/results/gpu_run}")
mkdir -p "$out"
python=${PYTHON:-python3}
flag=()

if [[ $dry == 1 ]]; then
  flag=(--dry-run)
  export PYTHONPATH=$root/src${PYTHONPATH:+:$PYTHONPATH}
elif "$python" -c 'import jax, torch, timm; assert jax.default_backend() == "gpu" and torch.cuda.is_available()' 2>/dev/null; then
  echo "using $(command -v "$python"): JAX on CUDA, torch with CUDA and timm are there"
  site=$(mktemp -d /tmp/deit-site.XXXX)
  missing=$("$python" - <<'PY'
import importlib.util
names = {"grain": "grain", "array_record": "array-record", "tyro": "tyro",
         "tensorboardX": "tensorboardX", "docstring_parser": "docstring-parser",
         "typeguard": "typeguard", "shtab": "shtab", "portpicker": "portpicker",
         "simplejpeg": "simplejpeg"}
print(" ".join(w for m, w in names.items() if importlib.util.find_spec(m) is None))
PY
)
  if [[ -n $missing ]]; then
    echo "installing from .whl/ without network: $missing"
    files=()
    for name in $missing; do
      pattern=$(echo "$name" | tr 'A-Z-' 'a-z_')
      match=$(ls .whl 2>/dev/null | tr 'A-Z' 'a-z' | grep -n "^${pattern}-" | head -1 | cut -d: -f1)
      [[ -z $match ]] && { echo "no wheel of $name in .whl/: run 'bash bench/gpu.sh --wheels' on a machine with network"; exit 1; }
      files+=(".whl/$(ls .whl | sed -n "${match}p")")
    done
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${files[@]}" || exit 1
  fi
  export PYTHONPATH=$site:$root/src
else
  echo "no Python with JAX on CUDA, torch with CUDA and timm: making .venv-gpu from the network"
  python3 -m venv .venv-gpu && . .venv-gpu/bin/activate || exit 1
  pip install -q -e ".[test]" "jax[cuda13]" || exit 1
  python=python
  unset PYTHONPATH
fi
# JAX and torch share the GPU: JAX takes memory as it needs it instead of 75% at start.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
# inductor's compile pools would otherwise take every core from JAX's tracing (seen on the H200
# machine: nothing of JAX's compiled within the table's time).
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-2}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.csv" 2>/dev/null

stage() {  # stage NAME SECONDS: one part of gpu.py, with its own timeout and log
  local start=$(date +%s)
  timeout -k 10 "$2" "$python" "$root/bench/gpu.py" "$1" "${flag[@]}" --out "$out/$1.json" \
    > "$out/$1.log" 2>&1
  echo "$1: exit $? after $(( $(date +%s) - start )) s (log: $out/$1.log)"
}
# DEIT_GPU_STAGES picks stages ("table loop"): a rerun need not repeat what is measured.
declare -A seconds=([table]=300 [compile]=140 [loop]=120)
for what in ${DEIT_GPU_STAGES:-table compile loop}; do
  [[ -n ${seconds[$what]:-} ]] || { echo "DEIT_GPU_STAGES: unknown stage '$what' (table, compile, loop)"; exit 2; }
  stage "$what" "${seconds[$what]}"
done
gpu=$(head -2 "$out/gpu.csv" 2>/dev/null | tail -1 | cut -d, -f1 | tr 'A-Z ' 'a-z_' | tr -cd 'a-z0-9_')
name=gpu_${gpu:-unknown}
[[ $dry == 1 ]] && name=gpu_dry_run
"$python" "$root/bench/gpu.py" report --dir "$out" --name "$name" > "$out/report.log" 2>&1
echo "report: bench/results/$name.md"
