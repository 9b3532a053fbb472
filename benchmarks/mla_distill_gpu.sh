#!/usr/bin/env bash
# The #36 GPU check, one script for a lent device: the default distillation recipe (DistillConfig: lr 5e-4,
# warmup 10 steps, spike guard 3x) at 250k, 1M and 2M tokens, bf16 autocast, 16 x 512 tokens a step.
#
#     MODEL=/tmp/smol IDS=.gpu/ids.pt OUT=$OUT bash benchmarks/mla_distill_gpu.sh
#
# MODEL: SmolLM2-135M (zoo name or folder); IDS: calib/train/eval token ids saved by torch.save (machines
# without the corpus; see benchmarks/results/device/README.md), else the zoo's python-docs text is read.
# Each JSON row has the held-out ppl twice (plain fp32 forward, and the autocast no-grad path) and the mean
# training loss since the last mark, so a training breakdown and an inference-kernel fault read apart.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results/device}
ids=${IDS:+--ids $IDS}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
for tokens in 250000 1000000 2000000; do
  python benchmarks/mla.py --model "${MODEL:-smollm2-135m}" $ids --device cuda --sections distill \
    --mixed-precision bf16 --distill-tokens "$tokens" --batch-size 16 --seq-len 512 --lr 5e-4 \
    --out "$out/mla_gpu_distill_default_${tokens}.json" 2>&1 | grep -v "^W[0-9]"
done
