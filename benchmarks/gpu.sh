#!/usr/bin/env bash
# The GPU measurements behind docs/performance.md and docs/training.md, in one script.
# Usage: benchmarks/gpu.sh CIFAR_SAMPLE_DIR [OUT_DIR]   (on a machine with CUDA and explainkit)
set -uo pipefail
DATA=${1:?path to the CIFAR-10 sample (folder containing cifar-10-batches-py)}
OUT=${2:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 EXPLAINKIT_LOAD_PLUGINS=
py=${PYTHON:-python3}
nvidia-smi -L
$py -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

echo "== training throughput: bare loop vs explainkit's epoch loop (50,000 images)"
for model in resnet18-s8 resnet18; do
  $py benchmarks/train_throughput.py --device cuda --width 64 --images 50000 \
      --batch-size 128 --model "$model" --repeats 2
done
$py benchmarks/train_throughput.py --device cuda --width 64 --images 50000 --batch-size 512 \
    --model resnet18 --repeats 2

echo "== Grad-CAM speed: plain inference vs native vs Captum vs naive PyTorch"
$py benchmarks/gradcam_speed.py --device cuda --width 64 --batch-size 64 --images 4096 --repeats 3
$py benchmarks/gradcam_speed.py --device cuda --width 64 --batch-size 256 --images 8192 --repeats 3

echo "== recipe on the real CIFAR-10 sample, full width, 20 epochs"
$py benchmarks/recipe.py --device cuda --width 64 --epochs 20 --seeds 3 \
    --data-dir "$DATA" --variants seed,default

echo "== end to end on CUDA: train (AMP, channels_last), analyze, report"
$py -m explainkit train --dataset cifar10 --data-dir "$DATA" --width 64 --epochs 3 \
    --out "$OUT/run" --overwrite --quiet
$py -m explainkit analyze "$OUT/run" --plugin gradcam --plugin captum --plugin gallery \
    --plugin losses --captum-limit 256
$py -m explainkit inspect "$OUT/run"
