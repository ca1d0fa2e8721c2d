#!/usr/bin/env bash
# CI on the oldest Triton fastpeft supports (pyproject.toml's floor, which torch 2.10 and 2.11 pin): a venv with
# the CPU build of torch, that Triton and the project without its dependencies; then the import, the compile gate
# on the decode, dequantize, quantize and GEMM families (the small-M GEMM holds the tile chosen by Triton version)
# with the binding check, and the interpreter tests of the decode kernel and of NF4.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

floor=$(sed -nE 's/^ *"triton>=([0-9]+\.[0-9]+)[;"].*/\1/p' pyproject.toml)
[ -n "$floor" ] || { echo "oldest_triton: no triton>= floor in pyproject.toml" >&2; exit 1; }

rm -rf .venv-floor
python3 -m venv .venv-floor
# shellcheck disable=SC1091
. .venv-floor/bin/activate
python -m pip install --quiet --upgrade pip
pip install --quiet torch==2.13.0  # the CPU build (the local wheel): any other torch request pulls the CUDA build
# Triton 3.6's interpreter breaks every loop over a runtime range under numpy 2.4 (Triton 3.7 fixed it)
pip install --quiet "triton==${floor}.*" "numpy<2.4" pytest hypothesis safetensors tqdm
pip install --quiet --no-deps -e .
python -c "import fastpeft, fastpeft.kernels.lora_linear, triton, numpy, torch
print('oldest_triton: fastpeft', fastpeft.__version__, 'on triton', triton.__version__, 'torch', torch.__version__,
      'numpy', numpy.__version__)"

python -m fastpeft.kernels._gate --report --family nf4_decode nf4_dequantize nf4_quantize dynamic8_quantize \
    --path tiled small
python -m pytest -q -m compile_gate tests/kernels/test_compile_gate.py -k "binding or fresh_compile"
python -m pytest -q tests/kernels/test_lora_linear_decode.py tests/kernels/test_nf4.py
echo "oldest_triton: done in $(( $(date +%s) - start )) s"
