#!/usr/bin/env bash
# Table 3's learned arms on one lent GPU: the policy (python -m training.train_policy, alignment reward, per-prompt
# baseline) on each start model under gpu/policy-start/NAME-seedS/{model,tokenizer} (copies of the fixed-order arms'
# final/model and final/tokenizer, trained on the CPU) at each learning rate of LRS, all at once, each for
# POLICY_STEPS steps or until MAX_MINUTES (policy seed S + SEED_OFFSET). Each run's rewards.jsonl and final/ folder
# (without the VQ model, which is the bundled one) come back as one archive. Run from the repo root; the prompts are
# those of training/make_bundled_model.sh's data set (same seed), made again here; gpu/whl holds the wheels the GPU
# image lacks. As run for the README's table 3 (carry gpu/whl and gpu/policy-start):
#   MAX_MINUTES=5.3 LRS="1e-4 3e-4" bash docs/learned-order/run_gpu.sh      # starts: quant-error-seed{0,1}
#   MAX_MINUTES=5.0 LRS=3e-4 SEED_OFFSET=100 bash docs/learned-order/run_gpu.sh   # starts: the 3e-4 runs' final/
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
began=$(date +%s)
OUT=${OUT:-/tmp/out}; W=${WORK:-gpu/work}; mkdir -p "$OUT" "$W/logs"
PY=${PY:-python3}; POLICY_STEPS=${POLICY_STEPS:-100000}; MAX_MINUTES=${MAX_MINUTES:-6}
SEED_OFFSET=${SEED_OFFSET:-0}  # added to the policy seed: a run continued from another's weights draws new prompts
BATCH=${BATCH:-64}; ROLLOUTS=${ROLLOUTS:-8}; LRS=${LRS:-"1e-4 3e-4"}; NUM_TRAIN=${NUM_TRAIN:-20000}
if [ "${INSTALL:-1}" != 0 ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site gpu/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
VQ=progressive_denoising/bundled/pdm-shapes/vqvae
$PY -m progressive_denoising.cli make-shapes --out "$W/shapes32" --num-train "$NUM_TRAIN" --num-validation 10 \
    --num-test 10 --seed 0 --size 32 > "$W/logs/shapes.log" 2>&1 || { tail -n 20 "$W/logs/shapes.log"; exit 1; }
$PY -m progressive_denoising.cli tokenize --dataset "$W/shapes32" --split train --vqvae $VQ --output "$W/codes" \
    --batch-size 1024 > "$W/logs/tokenize.log" 2>&1 || { tail -n 20 "$W/logs/tokenize.log"; exit 1; }
echo "setup done after $(( $(date +%s) - began )) s"
for start in gpu/policy-start/*/; do for lr in $LRS; do
  name=$(basename "$start")-lr$lr; seed=${name##*seed}; seed=${seed%%-*}
  $PY -m training.train_policy --model_name_or_path "$start/model" --tokenizer "$start/tokenizer" --vqvae $VQ \
      --dataset "$W/codes" --reward alignment --recogniser progressive_denoising/bundled/pdm-shapes/recogniser \
      --train_batch_size "$BATCH" --rollouts_per_prompt "$ROLLOUTS" --baseline per-prompt --learning_rate "$lr" \
      --max_train_steps "$POLICY_STEPS" --max_minutes "$MAX_MINUTES" --seed $(( seed + SEED_OFFSET )) \
      --output_dir "$W/policy/$name" > "$W/logs/policy-$name.log" 2>&1 &
done; done
for _ in $(seq 18); do sleep 5; [ -z "$(jobs -r)" ] && break; done
for f in "$W"/policy/*/rewards.jsonl; do echo "$f: $(wc -l < "$f") steps after $(( $(date +%s) - began )) s"; done
wait
for run in "$W"/policy/*/; do
  name=$(basename "$run")
  tail -n 3 "$W/logs/policy-$name.log"
  tar czf "$OUT/policy-$name.tgz" --exclude=vqvae -C "$W/policy" "$name"
done
tar czf "$OUT/logs.tgz" "$W/logs"
echo "all done after $(( $(date +%s) - began )) s"; ls -la "$OUT"
