#!/usr/bin/env bash
# One command for a short GPU window: the GPU tests, then the benchmark window plan, all under one folder.
#
#   bash benchmarks/gpu_check.sh                 # pytest -m gpu, then fastpeft bench within the time left
#   bash benchmarks/gpu_check.sh bench           # the benchmark window plan alone (--budget 480)
#   bash benchmarks/gpu_check.sh tests           # pytest -m gpu alone
#   bash benchmarks/gpu_check.sh install         # install and import alone (needs no GPU)
#
# Works on a machine that has torch, triton, transformers and peft but no network: the project installs with
# `pip install --no-deps --no-build-isolation -e .` (nothing fetched; where that fails, for want of setuptools,
# the steps below run the source tree itself), and bitsandbytes, when missing, from a wheel carried with the tree
# (BNB_WHEEL=path, or bitsandbytes-*.whl under wheels/, benchmarks/wheels/ or shared/wheels/). Any torch from
# 2.10 with the Triton it pins (3.6 or newer) will do.
# Everything lands in RESULTS (default benchmarks/results/<gpu>-<date>/): install.log, env.txt,
# pytest-gpu.log, bench.log and the suite's results.csv, summary.md, manifest.json and plots.
#
# Time: the whole script stays within TOTAL seconds (default 540, under a 10-minute command limit): the GPU
# tests get at most TEST_TIMEOUT (default 150), the benchmark plan what is left, at most BUDGET (default 480).
# Triton's kernel cache and autotune results (TRITON_CACHE_AUTOTUNING=1) persist, so a rerun in the same
# window skips compilation and autotuning.
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
start=$(date +%s)
TOTAL=${TOTAL:-540}
TEST_TIMEOUT=${TEST_TIMEOUT:-150}
BUDGET=${BUDGET:-480}

if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    gpu=$(python -c "import torch; print(torch.cuda.get_device_name())")
    slug=$(echo "$gpu" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-|-$//g')
    RESULTS=${RESULTS:-benchmarks/results/${slug}-$(date -u +%Y-%m-%d)}
elif [ "$what" = install ]; then
    gpu="no GPU"
    RESULTS=${RESULTS:-${TMPDIR:-/tmp}/fastpeft-gpu-check-install}
else
    echo "gpu_check: no CUDA GPU visible; without one run: fastpeft bench --quick" >&2
    exit 2
fi
mkdir -p "$RESULTS"
echo "gpu_check: $gpu -> $RESULTS"

{
    if ! pip install --no-deps --no-build-isolation -e .; then
        echo "gpu_check: pip could not install the project; running it from the source tree"
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
    if ! python -c "import bitsandbytes" 2>/dev/null; then
        wheel=""
        for w in ${BNB_WHEEL:-} wheels/bitsandbytes-*.whl benchmarks/wheels/bitsandbytes-*.whl shared/wheels/bitsandbytes-*.whl; do
            if [ -f "$w" ]; then wheel=$w; break; fi
        done
        if [ -n "$wheel" ]; then
            pip install --no-deps "$wheel"
        else
            echo "no bitsandbytes wheel carried: the bnb providers are skipped (their reason is in the summary)"
        fi
    fi
} >"$RESULTS/install.log" 2>&1
tail -n 2 "$RESULTS/install.log"
{
    nvidia-smi || true
    python - <<'EOF'
import importlib.metadata as md
for dist in ("torch", "triton", "transformers", "peft", "bitsandbytes", "matplotlib", "fastpeft"):
    try:
        print(dist, md.version(dist))
    except md.PackageNotFoundError:
        print(dist, "not installed")
EOF
} >"$RESULTS/env.txt" 2>&1
# the import of every kernel module (their Triton decorators run; nothing compiles) and of the benchmarks
if ! python -c "
import fastpeft, torch, triton
from fastpeft.kernels import adapter, cross_entropy, lora_batched, lora_linear, lora_linear_decode, nf4
import benchmarks.suite  # as python -m benchmarks runs it, from this directory
print('gpu_check: import ok: fastpeft', fastpeft.__version__, 'torch', torch.__version__, 'triton', triton.__version__)
"; then
    echo "gpu_check: fastpeft does not import here (install.log: $RESULTS/install.log)" >&2
    exit 1
fi
[ "$what" = install ] && exit 0

export TRITON_CACHE_AUTOTUNING=1
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
unset TRITON_INTERPRET
status=0

if [ "$what" = all ] || [ "$what" = tests ]; then
    timeout "$TEST_TIMEOUT" python -m pytest -q -m gpu -p no:cacheprovider tests >"$RESULTS/pytest-gpu.log" 2>&1
    rc=$?
    echo "gpu_check: pytest -m gpu exit $rc ($( tail -n 1 "$RESULTS/pytest-gpu.log"))"
    [ $rc -ne 0 ] && status=1
fi

if [ "$what" = all ] || [ "$what" = bench ]; then
    left=$(( TOTAL - ($(date +%s) - start) - 30 ))  # 30 s for start-up, estimates, summary and plots
    budget=$(( left < BUDGET ? left : BUDGET ))
    if [ "$budget" -lt 60 ]; then
        echo "gpu_check: only ${budget} s left for the benchmarks; run: bash benchmarks/gpu_check.sh bench" >&2
        exit 1
    fi
    extra=()
    [ -n "${GATE_JSON:-}" ] && extra+=(--gate-json "$GATE_JSON")
    python -m benchmarks --budget "$budget" --out "$RESULTS" --no-progress ${extra[@]+"${extra[@]}"} 2>&1 | tee "$RESULTS/bench.log"
    [ "${PIPESTATUS[0]}" -ne 0 ] && status=1
fi
echo "gpu_check: done in $(( $(date +%s) - start )) s; results in $RESULTS"
exit $status
