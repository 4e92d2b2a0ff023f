#!/bin/bash
# The checks that need a machine this one is not: more cores and a GPU (issue 18's 4-rank targets, NCCL, embed
# on a GPU). One script, about 9 minutes on a 16-core machine with one GPU; each step bounded by `timeout`.
#
#   bash bench/device_check.sh OUT_DIR
#
# On a machine whose Python lacks some of the package's dependencies (a GPU image with its own torch), carry
# them as wheels in .whl/ (e.g. `pip download --no-deps --only-binary=:all: --python-version 3.12 ... jsonschema
# jsonschema-specifications referencing rpds-py soundfile cffi pycparser soxr`): they are installed into
# /tmp/site first. Results: OUT_DIR/scale.json, embed_ranks.json, embed_inputs.json, embed_cuda.json and the log on stdout.
set -u
out=${1:?usage: bash bench/device_check.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
echo "== machine"; nproc; nvidia-smi -L 2>/dev/null
python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available())"
echo "== CUDA and NCCL tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/runtime/test_ranks_cuda.py 2>&1 | tail -8
echo "== train: 1 thread, 2 and 4 ranks (CPU, page cache warm), then one process cold on the CPU and on the GPU"
timeout 400 python3 bench/bench_scale.py --sizes 16k --distinct 1000 --json "$out/scale.json" \
  --commands train,train-1thread,train-2ranks,train-4ranks --warm train-1thread,train-2ranks,train-4ranks \
  --timeout 150 2>&1 | tail -16
echo "== embed: 1, 2 and 4 ranks on CPU cores (one thread each)"
timeout 200 python3 bench/bench_embed.py --ranks 1,2,4 --clips 16 --batch-size 1 --json "$out/embed_ranks.json" 2>&1 \
  | grep -v "Writing model"
echo "== embed's input side (read, resample, features) on 1, 2, 4 and 8 read workers"
timeout 90 python3 bench/bench_embed.py --inputs 1,2,4,8 --clips 128 --clip-seconds 10 \
  --json "$out/embed_inputs.json" 2>&1 | grep -v "Writing model"
if python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "== embed on the GPU"
  timeout 120 python3 bench/bench_embed.py --device cuda --clips 256 --batch-size 32 --read-workers 8 \
    --json "$out/embed_cuda.json" 2>&1 | grep -v "Writing model"
fi
echo "== done"
