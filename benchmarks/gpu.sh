#!/usr/bin/env bash
# The GPU checks and figures in one go, for a machine with a CUDA GPU whose python3 has torch, numpy, Pillow,
# safetensors, tqdm, scikit-image and matplotlib (facevae itself is taken from src/, not installed):
#   1. the GPU tests (tests/test_gpu.py: no training step waits for the GPU, device formulas equal the CPU's);
#   2. training throughput at batch 64 (facevae, the JPEG DataLoader reference, the bare loop);
#   3. facevae against the bare loop at batch 256;
#   4. the demo's training and evaluation on the GPU, timed.
# Logs go to $OUT (or a new temporary folder). Usage: bash benchmarks/gpu.sh
set -u
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
out=${OUT:-$(mktemp -d)}
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$out/gpu.txt"
$py -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())' \
  2>&1 | tee -a "$out/gpu.txt"
nproc | tee -a "$out/gpu.txt"
timeout 180 $py -m pytest tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tee "$out/test_gpu.log"
timeout 150 $py benchmarks/train_throughput.py --steps 50 --batch-size 64 2>&1 | tee "$out/throughput_b64.log"
timeout 150 $py benchmarks/train_throughput.py --steps 50 --batch-size 256 --bare-only 2>&1 \
  | tee "$out/throughput_b256.log"
run=$(mktemp -d)/lfw-faces
export FACEVAE_CACHE=$(mktemp -d)
{ time timeout 120 $py -m facevae train --config configs/lfw-faces.toml --out "$run" --quiet; } 2>&1 \
  | tee "$out/demo.log"
{ time timeout 60 $py -m facevae evaluate "$run" --iw-samples 100; } 2>&1 | tee -a "$out/demo.log"
