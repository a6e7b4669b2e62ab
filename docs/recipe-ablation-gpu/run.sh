#!/usr/bin/env bash
# Recipe ablation on the lent GPU: every arm of train_pdm.py at the step budget that equals N minutes on the
# 2-core CPU, trained in parallel, then scored by benchmarks/shapes_tables.py recipe. Run from the repo root.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
OUT=${OUT:-/tmp/out}; W=${WORK:-gpu/work}; mkdir -p "$OUT" "$W/logs"
PY=${PY:-python3}
TRAIN_SECONDS=${TRAIN_SECONDS:-300}
if [ -n "${INSTALL:-1}" ] && [ "${INSTALL:-1}" != 0 ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site gpu/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
$PY -c "import torch, datasets, diffusers, transformers, accelerate, progressive_denoising as p; print('env', torch.__version__, torch.cuda.is_available(), datasets.__version__, diffusers.__version__, transformers.__version__, accelerate.__version__)" > "$OUT/env.txt" 2>&1 || { tail -n 5 "$OUT/env.txt"; exit 1; }
cat "$OUT/env.txt"
VQ=gpu/vq
if [ "${TRAIN_VQ:-1}" != 0 ]; then
  VQ=$W/vq
  $PY -m training.train_vqvae --dataset gpu/shapes32 --output_dir $VQ --resolution 32 --max_train_steps ${VQ_STEPS:-3000} --train_batch_size 64 --learning_rate 2e-3 \
      --block_out_channels 32 64 --norm_num_groups 8 --num_codes 128 --foreground_weight 10 \
      --max_eval_images 1000 --seed 0 --merge_tolerance 0.1 --merge_steps ${MERGE_STEPS:-500} --device ${DEVICE:-cuda} --overwrite \
      > "$W/logs/vq.log" 2>&1 || { tail -n 20 "$W/logs/vq.log"; exit 1; }
  tail -n 3 "$W/logs/vq.log"
  $PY gpu/eval_vq.py $VQ progressive_denoising/bundled/pdm-shapes/recogniser gpu/shapes32 2>&1 | grep -v Warn | tail -n 2 | tee "$OUT/vq_eval.txt"
fi
sed "s#runs/shapes32-codes#$W/codes#; s#runs/vq32#$VQ#" training/configs/shapes32_cpu.yaml > "$W/config.yaml"
$PY -m progressive_denoising.cli tokenize --dataset gpu/shapes32 --split train --vqvae $VQ \
    --output "$W/codes" --batch_size 1024 --overwrite > "$W/logs/tokenize.log" 2>&1 || { tail -n 20 "$W/logs/tokenize.log"; exit 1; }
tail -n 1 "$W/logs/tokenize.log"

# name|overrides (steps: 15 CPU-minutes of each arm at its measured CPU seconds per step; x3: 45 minutes)
ARMS=(
  "base|max_train_steps=${BASE_STEPS:-1250}"
  "paper-token-loss|max_train_steps=${BASE_STEPS:-1250},token_loss_positions=stage"
  "characters|max_train_steps=${BASE_STEPS:-1250},tokenizer_level=character"
  "random-order|max_train_steps=${BASE_STEPS:-1250},order=random"
  "data-20k|max_train_steps=${BASE_STEPS:-1250},max_train_examples=20000"
  "lr-2e-3|max_train_steps=${BASE_STEPS:-1250},learning_rate=2e-3"
  "batch-32|max_train_steps=${BATCH32_STEPS:-2400},train_batch_size=32"
  "width-256|max_train_steps=${WIDE_STEPS:-725},hidden_size=256,intermediate_size=1024"
  "depth-8|max_train_steps=${DEEP_STEPS:-700},num_hidden_layers=8"
  "ar|max_train_steps=${BASE_STEPS:-1250},model_type=ar"
  "base-x3|max_train_steps=${BASE_X3_STEPS:-3750}"
  "width-256-x3|max_train_steps=${WIDE_X3_STEPS:-2175},hidden_size=256,intermediate_size=1024"
)
for arm in "${ARMS[@]}"; do
  name=${arm%%|*}; overrides=${arm#*|}
  timeout "$TRAIN_SECONDS" $PY -m training.train_pdm --config "$W/config.yaml" --output_dir "$W/ablate/$name/seed=0" \
      --num_samples 0 --eval_steps 100000 --checkpointing_steps 100000 --log_with null ${overrides//,/ } \
      > "$W/logs/$name.log" 2>&1 &
done
wait
specs=()
for arm in "${ARMS[@]}"; do
  name=${arm%%|*}; overrides=${arm#*|}
  if [ -d "$W/ablate/$name/seed=0/final" ]; then specs+=(--arm "$name:$overrides"); else echo "not finished: $name"; tail -n 3 "$W/logs/$name.log"; fi
done
for arm in "${ARMS[@]}"; do name=${arm%%|*}; tail -n 1 "$W/ablate/$name/seed=0/losses.jsonl" 2>/dev/null | sed "s/^/$name /"; done > "$OUT/last_losses.txt"
$PY -m benchmarks.shapes_tables recipe --config "$W/config.yaml" --runs "$W/ablate" \
    --recogniser progressive_denoising/bundled/pdm-shapes/recogniser --data gpu/shapes32 --num-prompts ${NUM_PROMPTS:-500} \
    --device ${DEVICE:-cuda} "${specs[@]}" --out "$OUT/ablation.json" --md "$OUT/ablation.md" 2>&1 | grep -v Warning | tail -n 30
tar czf "$OUT/logs.tgz" "$W/logs" "$W"/ablate/*/seed=0/losses.jsonl 2>/dev/null
