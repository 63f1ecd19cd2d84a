#!/usr/bin/env bash
# The GPU benchmark of issue 16 in one call on a CUDA machine (docs/benchmarks.md, "GPU"): Wan2.1-1.3B
# architecture at 832x480, bf16, FPS and first-chunk latency with the Wan VAE, TAEHV and the transformer alone, with
# torch.compile, CUDA graphs and flash attention reported on/off. Under 8 minutes on one H100/H200.
#
# Runs from the repository root with the machine's python3 (its torch), sfvideo from src/ (no install). Wheels in
# .whl/ (e.g. diffusers, which the device image lacks) are installed to /tmp/site first. Writes bench_gpu.json and
# bench_gpu.log to $OUT (the device tool's output folder) or the current folder. Extra arguments go to the bench
# (e.g. --with_diffusers, --no_cuda_graphs).
set -euo pipefail
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-.}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', \
diffusers.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
python3 -m sfvideo.bench generate --gpu --json "$out/bench_gpu.json" "$@" 2>&1 | tee "$out/bench_gpu.log"
