#!/usr/bin/env bash
# Table 3 (orders) or table 5 (probability of pseudo errors) on one lent GPU: the arms of
#   python -m benchmarks.shapes_tables $TABLE --config training/configs/shapes32_cpu.yaml --max_steps 3000 \
#       --train-seeds 0,1 ...
# (every arm x 2 training seeds, each 3000 steps at batch 32: 6 minutes of the 2-core CPU an arm) trained all at
# once, then scored by that same command, which finds the arms trained and only samples them (table 3 also trains
# its learned arms there: the policy on each quant-error arm).
#   TABLE=p-error bash docs/tables/run_gpu.sh      TABLE=orders bash docs/tables/run_gpu.sh
# Within one device call: arms still running at the deadline are stopped and left out (seed 1 first, when the
# step rate measured after a minute says all cannot finish). Run from the repo root; the data are made again as
# training/make_bundled_model.sh makes them (same seed and sizes); gpu/whl holds the wheels the GPU image lacks.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
began=$(date +%s)
TABLE=${TABLE:-p-error}
case $TABLE in
  p-error) ARMS=("p_error=0.0|p_error=0.0" "p_error=0.3|p_error=0.3" "p_error=0.5|p_error=0.5"
                 "p_error=0.7|p_error=0.7" "p_error=1.0|p_error=1.0") ;;
  orders) ARMS=("order=raster|order=raster" "order=random|order=random" "order=quant-error|order=quant-error"
                "order=reverse-quant-error|order=reverse-quant-error" "autoregressive_KV_cache|model_type=ar") ;;
  *) echo "TABLE must be p-error or orders"; exit 2 ;;
esac
OUT=${OUT:-/tmp/out}; W=${WORK:-gpu/work}; RUNS=${RUNS:-runs/tables-$TABLE}; mkdir -p "$OUT" "$W/logs" "$RUNS"
PY=${PY:-python3}; DEVICE=${DEVICE:-cuda}; MAX_STEPS=${MAX_STEPS:-3000}; SEEDS=${SEEDS:-"0 1"}
NUM_PROMPTS=${NUM_PROMPTS:-1000}
SCORE_ARMS=${SCORE_ARMS:-}  # shapes_tables --arms: score only these (e.g. leave the learned arm to another machine)
KEEP_WEIGHTS=${KEEP_WEIGHTS:-}  # arms whose final/ folders come back (one archive per seed, without the VQ model)
DEADLINE=${DEADLINE:-420}  # seconds after the start by which training must end (scoring needs the rest)
STOP=${STOP:-570}  # scoring stops here (each arm's scores are kept in its folder as they come)
if [ "${INSTALL:-1}" != 0 ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site gpu/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
VQ=progressive_denoising/bundled/pdm-shapes/vqvae  # the same weights as the config's runs/vq32-f4
DATA=${DATA:-$W/shapes32}
[ -d "$DATA" ] || $PY -m progressive_denoising.cli make-shapes --out "$DATA" --num-train 100000 --num-validation 1000 \
    --num-test 1000 --seed 0 --size 32 > "$W/logs/shapes.log" 2>&1 || { tail -n 20 "$W/logs/shapes.log"; exit 1; }
[ -d "$W/codes" ] || $PY -m progressive_denoising.cli tokenize --dataset "$DATA" --split train --vqvae $VQ \
    --output "$W/codes" --batch-size 1024 > "$W/logs/tokenize.log" 2>&1 || { tail -n 20 "$W/logs/tokenize.log"; exit 1; }
$PY - "$W" "$VQ" <<'PY'
import sys, yaml
work, vq = sys.argv[1:]
c = yaml.safe_load(open("training/configs/shapes32_cpu.yaml"))
c.update(dataset=f"{work}/codes", vqvae=vq, num_samples=0, eval_steps=10**6, checkpointing_steps=10**6,
         snapshot_steps=None, log_with=None)
yaml.safe_dump(c, open(f"{work}/config.yaml", "w"))
PY
echo "setup done after $(( $(date +%s) - began )) s"
declare -A PIDS
for seed in $SEEDS; do
  for arm in "${ARMS[@]}"; do
    name=${arm%%|*}; dir="$RUNS/$name/seed=$seed"
    [ -d "$dir/final" ] && continue
    $PY -m training.train_pdm --config "$W/config.yaml" --max_train_steps "$MAX_STEPS" --output_dir "$dir" \
        "${arm#*|}" "seed=$seed" > "$W/logs/$name-seed=$seed.log" 2>&1 &
    PIDS["$name/seed=$seed"]=$!
  done
done
steps() { { wc -l < "$RUNS/$1/losses.jsonl"; } 2>/dev/null || echo 0; }
all_steps() { for key in "${!PIDS[@]}"; do echo "$key $(steps "$key")"; done | sort; }
CHECK_AFTER=${CHECK_AFTER:-75}; sleep $(( CHECK_AFTER - 20 )); before=$(all_steps); sleep 20; after=$(all_steps)
echo "$after" | sed 's/$/ steps after '"$CHECK_AFTER"' s/' | tee "$OUT/rate.txt"
# Can the slowest arm finish by the deadline at its rate of the last 20 s? If not, stop every seed but the first (the
# GPU is shared, so the others speed up); what still runs at the deadline is stopped and left out.
rate=$(join <(echo "$before") <(echo "$after") | awk '{r = ($3 - $2) / 20; if (NR == 1 || r < m) m = r} END {print m}')
slowest=$(echo "$after" | awk '{print $2}' | sort -n | head -n 1)
left=$(( DEADLINE - ($(date +%s) - began) ))
first=${SEEDS%% *}
if awk -v r="$rate" -v s="$slowest" -v n="$MAX_STEPS" -v l="$left" 'BEGIN {exit !(r <= 0 || (n - s) / r > l)}'; then
  echo "too slow for all seeds ($rate steps/s for the slowest arm, ${left} s left): keeping seed $first" \
      | tee -a "$OUT/rate.txt"
  for key in "${!PIDS[@]}"; do [ "${key#*seed=}" != "$first" ] && kill "${PIDS[$key]}"; done
fi
while [ $(( $(date +%s) - began )) -lt "$DEADLINE" ] && [ -n "$(jobs -r)" ]; do sleep 5; done
for key in "${!PIDS[@]}"; do kill "${PIDS[$key]}" 2>/dev/null && echo "stopped at the deadline: $key"; done
wait
echo "training done after $(( $(date +%s) - began )) s"
done_seeds=""
for seed in $SEEDS; do
  complete=1; for arm in "${ARMS[@]}"; do [ -d "$RUNS/${arm%%|*}/seed=$seed/final" ] || complete=0; done
  [ $complete = 1 ] && done_seeds="$done_seeds,$seed"
done
done_seeds=${done_seeds#,}
echo "seeds with every arm finished: ${done_seeds:-none}"
if [ -n "$done_seeds" ]; then
  timeout $(( STOP - ($(date +%s) - began) )) $PY -m benchmarks.shapes_tables "$TABLE" --config "$W/config.yaml" \
      --max_steps "$MAX_STEPS" --runs "$RUNS" --train-seeds "$done_seeds" --num-prompts "$NUM_PROMPTS" \
      --recogniser progressive_denoising/bundled/pdm-shapes/recogniser --data "$DATA" --device "$DEVICE" \
      --arms "$SCORE_ARMS" --out "$OUT/$TABLE.json" --md "$OUT/$TABLE.md" 2>&1 | grep -v "Warning\|Loading\|Writing\|shared tensor" | tail -n 14
fi
# losses, rewards and scores come back (not the weights: 6.6 MB an arm)
tar czf "$OUT/arms.tgz" --exclude=final --exclude=checkpoints "$RUNS" "$W/logs" "$W/config.yaml"
for name in $KEEP_WEIGHTS; do
  for seed in $SEEDS; do
    [ -d "$RUNS/$name/seed=$seed/final" ] && tar czf "$OUT/final-${name//[^A-Za-z0-9._-]/_}-seed$seed.tgz" --exclude=vqvae \
        "$RUNS/$name/seed=$seed/final"
  done
done
echo "all done after $(( $(date +%s) - began )) s"; ls -la "$OUT"
