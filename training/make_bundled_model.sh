#!/usr/bin/env bash
# Rebuild the bundled PDM-Shapes pipeline (progressive_denoising/bundled/pdm-shapes) and its recogniser from
# nothing, on a 2-core CPU, in at most 2.5 hours (each step's minutes below and in $RUNS/timings.txt, measured on
# such a machine alone). Every step is deterministic per seed; $RUNS (default runs/) holds the intermediate
# artefacts; every step runs this checkout's code (python -m). An interrupted run: start it again; the PDM step resumes from its last checkpoint
# (`--resume_from_checkpoint latest`), finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
RUNS=${RUNS:-runs}
mkdir -p "$RUNS"
step() {  # step NAME COMMAND...: run and record its minutes
    local began=$SECONDS
    "${@:2}"
    echo "$1 $(( (SECONDS - began) / 60 )) min" | tee -a "$RUNS/timings.txt"
}

# 1. data: 100k train / 1k validation / 1k test scenes at 32x32 (under a minute)
[ -d "$RUNS/shapes32" ] || step data python -m progressive_denoising.cli make-shapes --out "$RUNS/shapes32" --num-train 100000 \
    --num-validation 1000 --num-test 1000 --seed 0 --size 32
# 2. image tokenizer: 8x8 codes of 4x4 pixels, 1024 codes, look-alike codes merged before the last 500 steps
#    (about 70 minutes: 1.03 s a step)
[ -f "$RUNS/vq32-f4/diffusion_pytorch_model.safetensors" ] || step vqvae python -m training.train_vqvae \
    --dataset "$RUNS/shapes32" --output_dir "$RUNS/vq32-f4" --resolution 32 --max_train_steps 4000 \
    --train_batch_size 64 --learning_rate 2e-3 --block_out_channels 32 64 128 --norm_num_groups 8 --num_codes 1024 \
    --foreground_weight 10 --max_eval_images 1000 --seed 0 --merge_purity 0.9 --merge_steps 500
# 3. codes and quantization errors of the training images (about three minutes)
[ -d "$RUNS/shapes32-codes-f4" ] || step tokenize python -m progressive_denoising.cli tokenize --dataset "$RUNS/shapes32" --split train \
    --vqvae "$RUNS/vq32-f4" --output "$RUNS/shapes32-codes-f4" --batch-size 256
# 4. the PDM (word tokenizer + jointly trained T5 with word positions + decoder), 26000 steps at batch 32 (about 55
#    minutes: compiled, 0.113 s a step, and checkpoints); writes a pipeline folder to $RUNS/pdm-shapes32/final
#    bf16 autocast only where the CPU has bf16 arithmetic: emulated on an AVX2-only CPU, a compiled step takes 3.8 s
#    there against 0.21 s in float32 (benchmarks/README.md)
PRECISION=$(python -c "from training.loop import cpu_has_bf16; print('bf16' if cpu_has_bf16() else 'no')")
[ -d "$RUNS/pdm-shapes32/final" ] || step pdm python -m training.train_pdm --config training/configs/shapes32_cpu.yaml \
    --dataset "$RUNS/shapes32-codes-f4" --vqvae "$RUNS/vq32-f4" --output_dir "$RUNS/pdm-shapes32" \
    --mixed_precision "$PRECISION" --resume_from_checkpoint latest
# 5. the attribute recogniser used by `pdm evaluate` (about five minutes)
[ -f "$RUNS/recogniser32/model.safetensors" ] || step recogniser python -m training.train_recogniser \
    --output_dir "$RUNS/recogniser32" --resolution 32 --num_scenes 20000 --max_train_steps 2500 --seed 0
# 6. the sampling defaults, chosen on the 1000 validation prompts and saved in model/generation_config.json (about six
#    minutes)
[ -f "$RUNS/pdm-shapes32/defaults.md" ] || step defaults python -m benchmarks.generation_defaults \
    --model "$RUNS/pdm-shapes32/final" --recogniser "$RUNS/recogniser32" --data "$RUNS/shapes32" \
    --grid "temperature=1.0,0.8,0.6" --grid "guidance_scale=1,2,3" --out "$RUNS/pdm-shapes32/defaults.md"
# 7. bundle: weights, configs and cards only (the package carries the code; a saved copy of the bundle, e.g. a Hub
#    upload, gets it from PDMPipeline.save_pretrained, for people without the package)
rm -rf progressive_denoising/bundled/pdm-shapes
mkdir -p progressive_denoising/bundled
cp -r "$RUNS/pdm-shapes32/final" progressive_denoising/bundled/pdm-shapes
cp -r "$RUNS/recogniser32" progressive_denoising/bundled/pdm-shapes/recogniser
find progressive_denoising/bundled/pdm-shapes -name "*.py" -delete
echo "bundled $(du -sh progressive_denoising/bundled/pdm-shapes | cut -f1) in progressive_denoising/bundled/pdm-shapes"
