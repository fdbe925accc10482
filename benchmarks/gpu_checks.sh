#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one run on a lent GPU machine (no network there): carried wheels in .whl,
# Fashion-MNIST's idx files in .gpudata. Each step has its own time limit so one slow step cannot eat the others.
#   bash benchmarks/gpu_checks.sh OUT_DIR
set -u
out=${1:?output folder}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PRODCAT_FASHION_MNIST_DIR="$PWD/.gpudata" HF_HUB_OFFLINE=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, timm, torchvision; print('torch', torch.__version__, 'timm', timm.__version__, 'tv', torchvision.__version__)" | tee -a "$out/gpu.txt"
timeout "${FMNIST_LIMIT_S:-390}" python3 benchmarks/fashion_mnist.py --preset gpu-pretrained --out "$out/fmnist.json" \
  > "$out/fmnist.log" 2>&1
echo "fashion_mnist rc=$?" | tee -a "$out/gpu.txt"
grep -v "it/s\]\|img/s\]" "$out/fmnist.log" | tail -25
timeout 90 python3 benchmarks/bench_gpu.py --jpegs 500 --out "$out/gpu.json" > "$out/bench_gpu.log" 2>&1
echo "bench_gpu rc=$?" | tee -a "$out/gpu.txt"
tail -15 "$out/bench_gpu.log"
timeout 60 python3 benchmarks/bench_loader.py --arch resnet50 --image-size 224 --batch-size 256 --devices cuda --no-check \
  --out "$out/loader.json" > "$out/loader.log" 2>&1; echo "loader rc=$?" | tee -a "$out/gpu.txt"
tail -5 "$out/loader.log"
