#!/usr/bin/env bash
# Fine-tune the bundled model 3000 steps with and without known regions (known_region_share 0 and 0.5), then
# score both with benchmarks/edit_shapes.py and shapes_tables.py stages. As run for the README (2-core CPU).
set -euo pipefail
cd "$(dirname "$0")/../../.."  # the repository root
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
mkdir -p runs/results
for share in 0 0.5; do
  out=runs/ft-known-$share
  [ -d $out/final ] || python -m training.train_pdm --config training/configs/shapes32_cpu.yaml \
    model_name_or_path=progressive_denoising/bundled/pdm-shapes/model tokenizer=progressive_denoising/bundled/pdm-shapes/tokenizer \
    train_tokenizer=false text_config=null max_train_steps=3000 learning_rate=3e-4 warmup_steps=100 known_region_share=$share \
    eval_steps=100000 checkpointing_steps=1000 snapshot_steps=null num_samples=0 log_with=null output_dir=$out \
    --resume_from_checkpoint latest > runs/ft-known-$share.log 2>&1
done
for share in 0 0.5; do
  python -m benchmarks.edit_shapes --model runs/ft-known-$share/final --recogniser progressive_denoising/bundled/pdm-shapes/recogniser \
    --data runs/shapes32 --num-scenes 300 --out runs/results/editing-known-$share.json --md runs/results/editing-known-$share.md > runs/ft-known-$share-edit.log 2>&1
  python -m benchmarks.shapes_tables stages --model runs/ft-known-$share/final --recogniser progressive_denoising/bundled/pdm-shapes/recogniser \
    --data runs/shapes32 --stages 16 --out runs/results/stages-known-$share.json --md runs/results/stages-known-$share.md > runs/ft-known-$share-stages.log 2>&1
done
