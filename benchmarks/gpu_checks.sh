#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one run on a lent GPU machine (no network there): carried wheels in .whl,
# Fashion-MNIST's idx files in .gpudata. Each step has its own time limit so one slow step cannot eat the others.
#   bash benchmarks/gpu_checks.sh OUT_DIR [STEP...]
# Steps (default: all, in this order):
#   tests    the CUDA-only tests that need no database or browser (pytest --noconftest), ~20 s
#   lite0    training step vs loader for the GPU default (efficientnet_lite0, 128 px, batch 256), ~40 s
#   cudnn    a small and a large training call with cuDNN autotuning on and off (bench_cudnn.py), ~90 s
#   fmnist   Fashion-MNIST through the product, full fine-tune from the bundled backbone (FMNIST_ARGS adds options)
#   resnet50 resnet50 training/inference throughput and JPEG decoding (bench_gpu.py)
#   loader   loader vs step for resnet50 at 224 px
set -u
out=${1:?output folder}
shift
steps=${*:-tests lite0 cudnn fmnist resnet50 loader}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PRODCAT_FASHION_MNIST_DIR="$PWD/.gpudata" HF_HUB_OFFLINE=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, timm, torchvision; print('torch', torch.__version__, 'timm', timm.__version__, 'tv', torchvision.__version__)" | tee -a "$out/gpu.txt"
nproc | sed 's/^/cpus /' | tee -a "$out/gpu.txt"
df -m /tmp /dev/shm | tee -a "$out/gpu.txt"

for step in $steps; do
  case $step in
  tests)
    timeout 60 python3 -m pytest -q --noconftest -p no:cacheprovider tests/models/test_label_checks.py \
      tests/models/test_devices.py > "$out/tests.log" 2>&1
    echo "tests rc=$?" | tee -a "$out/gpu.txt"
    tail -4 "$out/tests.log" ;;
  cudnn)
    timeout 120 python3 benchmarks/bench_cudnn.py --out "$out/cudnn.json" > "$out/cudnn.log" 2>&1
    echo "cudnn rc=$?" | tee -a "$out/gpu.txt"
    tail -7 "$out/cudnn.log" ;;
  lite0)
    timeout 60 python3 benchmarks/bench_loader.py --arch efficientnet_lite0 --image-size 128 --batch-size 256 \
      --devices cuda --no-check --out "$out/lite0.json" > "$out/lite0.log" 2>&1
    echo "lite0 rc=$?" | tee -a "$out/gpu.txt"
    tail -6 "$out/lite0.log" ;;
  fmnist)
    # The data directory on a RAM disk when one is large enough (the import writes 60,000 originals and thumbnails,
    # the pixel cache ~3 GB): the import rate is then no disk's. Where it went is in gpu.txt.
    data=/tmp/fmnist-data
    free=$(df -m --output=avail /dev/shm 2>/dev/null | tail -1)
    if [ "${free:-0}" -gt 16000 ]; then data=/dev/shm/fmnist-data; fi
    echo "fmnist data dir $data" | tee -a "$out/gpu.txt"
    # shellcheck disable=SC2086  # FMNIST_ARGS is a list of options
    timeout "${FMNIST_LIMIT_S:-390}" python3 benchmarks/fashion_mnist.py --preset gpu-pretrained --data-dir "$data" \
      --out "$out/fmnist.json" ${FMNIST_ARGS:-} > "$out/fmnist.log" 2>&1
    echo "fashion_mnist rc=$?" | tee -a "$out/gpu.txt"
    cp "$data"/logs/benchmark-worker.log "$out/worker.log" 2>/dev/null
    grep -v "it/s\]\|img/s\]" "$out/fmnist.log" | tail -40 ;;
  resnet50)
    timeout 90 python3 benchmarks/bench_gpu.py --jpegs 500 --out "$out/gpu.json" > "$out/bench_gpu.log" 2>&1
    echo "bench_gpu rc=$?" | tee -a "$out/gpu.txt"
    tail -15 "$out/bench_gpu.log" ;;
  loader)
    timeout 60 python3 benchmarks/bench_loader.py --arch resnet50 --image-size 224 --batch-size 256 --devices cuda \
      --no-check --out "$out/loader.json" > "$out/loader.log" 2>&1
    echo "loader rc=$?" | tee -a "$out/gpu.txt"
    tail -5 "$out/loader.log" ;;
  *) echo "unknown step $step" ;;
  esac
done
