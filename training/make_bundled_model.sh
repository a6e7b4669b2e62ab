#!/usr/bin/env bash
# Rebuild the bundled PDM-Shapes pipeline (progressive_denoising/bundled/pdm-shapes) and its recogniser from
# nothing, on a 2-core CPU, in about an hour and three quarters (times per step below, measured on such a machine).
# Every step is deterministic per seed; runs/ holds the intermediate artefacts. An interrupted run: start it again;
# the PDM step resumes from its last checkpoint (`--resume_from_checkpoint latest`), finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

# 1. data: 100k train / 1k validation / 1k test scenes at 32x32 (under a minute)
[ -d runs/shapes32 ] || pdm make-shapes --out runs/shapes32 --num-train 100000 --num-validation 1000 \
    --num-test 1000 --seed 0 --size 32
# 2. image tokenizer: 8x8 codes of 4x4 pixels, 1024 codes, look-alike codes merged before the last 500 steps
#    (about 30 minutes)
[ -f runs/vq32-f4/diffusion_pytorch_model.safetensors ] || python -m training.train_vqvae --dataset runs/shapes32 \
    --output_dir runs/vq32-f4 --resolution 32 --max_train_steps 4000 --train_batch_size 64 --learning_rate 2e-3 \
    --block_out_channels 32 64 128 --norm_num_groups 8 --num_codes 1024 --foreground_weight 10 --max_eval_images 1000 \
    --seed 0 --merge_purity 0.9 --merge_steps 500
# 3. codes and quantization errors of the training images (about two minutes)
[ -d runs/shapes32-codes-f4 ] || pdm tokenize --dataset runs/shapes32 --split train --vqvae runs/vq32-f4 \
    --output runs/shapes32-codes-f4 --batch-size 256
# 4. the PDM (word tokenizer + jointly trained T5 + decoder), 30000 steps at batch 32 (about an hour: 57 minutes
#    here, 0.11 s a step and checkpoints); writes a pipeline folder to runs/pdm-shapes32/final
[ -d runs/pdm-shapes32/final ] || python -m training.train_pdm --config training/configs/shapes32_cpu.yaml \
    --resume_from_checkpoint latest
# 5. the attribute recogniser used by `pdm evaluate` (about 10 minutes)
[ -f runs/recogniser32/model.safetensors ] || python -m training.train_recogniser --output_dir runs/recogniser32 \
    --resolution 32 --num_scenes 20000 --max_train_steps 2500 --seed 0
# 6. bundle
rm -rf progressive_denoising/bundled/pdm-shapes
mkdir -p progressive_denoising/bundled
cp -r runs/pdm-shapes32/final progressive_denoising/bundled/pdm-shapes
cp -r runs/recogniser32 progressive_denoising/bundled/pdm-shapes/recogniser
# the package carries the code: the bundle holds weights, configs and cards only (a saved copy of it, e.g. a Hub
# upload, gets the code from PDMPipeline.save_pretrained, for people without the package)
find progressive_denoising/bundled/pdm-shapes -name "*.py" -delete
