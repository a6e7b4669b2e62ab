#!/usr/bin/env bash
# Does compute lift prompt alignment? The bundled recipe and a wider model, at batch 256 and 1024, each trained for
# the same wall-clock on one lent GPU (all arms at once), then scored by benchmarks/shapes_tables.py recipe on the
# 1000 test prompts. Each arm's step budget comes from a short calibration run of all arms together, so every arm
# ends its cosine schedule inside TRAIN_SECONDS. Run from the repo root; gpu/whl holds the wheels the GPU image lacks.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2
OUT=${OUT:-/tmp/out}; W=${WORK:-gpu/work}; mkdir -p "$OUT" "$W/logs"
PY=${PY:-python3}; DEVICE=${DEVICE:-cuda}
TRAIN_SECONDS=${TRAIN_SECONDS:-240}; NUM_TRAIN=${NUM_TRAIN:-100000}; NUM_PROMPTS=${NUM_PROMPTS:-1000}
if [ "${INSTALL:-1}" != 0 ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site gpu/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
$PY -c "import torch, diffusers, transformers; print('env', torch.__version__, torch.cuda.is_available(), diffusers.__version__, transformers.__version__)" || exit 1
VQ=progressive_denoising/bundled/pdm-shapes/vqvae
# the bundled model's data (same seed and sizes as training/make_bundled_model.sh) and its codes
$PY -m progressive_denoising.cli make-shapes --out $W/shapes32 --num-train $NUM_TRAIN --num-validation 1000 \
    --num-test 1000 --seed 0 --size 32 > "$W/logs/shapes.log" 2>&1 || { tail -n 20 "$W/logs/shapes.log"; exit 1; }
$PY -m progressive_denoising.cli tokenize --dataset $W/shapes32 --split train --vqvae $VQ --output "$W/codes" \
    --batch-size 1024 > "$W/logs/tokenize.log" 2>&1 || { tail -n 20 "$W/logs/tokenize.log"; exit 1; }
tail -n 1 "$W/logs/tokenize.log"
$PY - "$W" "$VQ" <<'PY'
import sys, yaml
work, vq = sys.argv[1:]
c = yaml.safe_load(open("training/configs/shapes32_cpu.yaml"))
c.update(dataset=f"{work}/codes", vqvae=vq, num_samples=0, eval_steps=10**6, checkpointing_steps=10**6,
         snapshot_steps=None, log_with=None, num_workers=2)
yaml.safe_dump(c, open(f"{work}/config.yaml", "w"))
PY
WIDE="hidden_size=256,num_hidden_layers=8,num_attention_heads=8,intermediate_size=1024"
ARMS=(
  "bundled-b256|train_batch_size=256,learning_rate=2e-3"
  "bundled-b1024|train_batch_size=1024,learning_rate=2e-3"
  "wide-b256|train_batch_size=256,learning_rate=1e-3,$WIDE"
  "wide-b1024|train_batch_size=1024,learning_rate=1.5e-3,$WIDE"
)
if [ -n "${ONLY:-}" ]; then  # ONLY="name name": a subset of the arms
  kept=(); for arm in "${ARMS[@]}"; do [[ " $ONLY " == *" ${arm%%|*} "* ]] && kept+=("$arm"); done; ARMS=("${kept[@]}")
fi
train() {  # "name|key=value,...", output folder, max_train_steps, warmup (wide arms also get a wider T5)
  local name=${1%%|*} args; IFS=, read -ra args <<< "${1#*|}"
  [[ $name == wide* ]] && args+=("text_config={d_model: 256, d_ff: 1024, num_layers: 4, num_heads: 4, d_kv: 64}")
  $PY -m training.train_pdm --config "$W/config.yaml" --output_dir "$2" --max_train_steps "$3" --warmup_steps "$4" "${args[@]}"
}
# calibration: all arms together, as in the real run; seconds per step between steps 20 and 60
for arm in "${ARMS[@]}"; do name=${arm%%|*}; train "$arm" "$W/cal/$name" 60 10 > "$W/logs/cal-$name.log" 2>&1 & done; wait
declare -A STEPS
for arm in "${ARMS[@]}"; do
  name=${arm%%|*}
  STEPS[$name]=$($PY -c "
import json; r=[json.loads(l) for l in open('$W/cal/$name/losses.jsonl')]; t={x['step']: x['train_seconds'] for x in r}
print(int(0.85 * $TRAIN_SECONDS * 40 / (t[60] - t[20])))" 2>/dev/null) || { echo "calibration failed: $name"; tail -n 5 "$W/logs/cal-$name.log"; }
  echo "$name: ${STEPS[$name]:-?} steps"
done | tee "$OUT/steps.txt"
while read -r name steps _; do STEPS[${name%:}]=$steps; done < "$OUT/steps.txt"
for arm in "${ARMS[@]}"; do
  name=${arm%%|*}; [ "${STEPS[$name]:-?}" = "?" ] && continue
  timeout $((TRAIN_SECONDS + 150)) bash -c "$(declare -f train); PY=$PY W=$W; train '$arm' '$W/arms/$name/seed=0' ${STEPS[$name]} 500" \
      > "$W/logs/$name.log" 2>&1 &
done; wait
specs=()
for arm in "${ARMS[@]}"; do
  name=${arm%%|*}
  if [ -d "$W/arms/$name/seed=0/final" ]; then specs+=(--arm "$name:"); else echo "not finished: $name"; tail -n 3 "$W/logs/$name.log"; fi
  tail -n 1 "$W/arms/$name/seed=0/losses.jsonl" 2>/dev/null | sed "s/^/$name /" >> "$OUT/last_losses.txt"
done
$PY -m benchmarks.shapes_tables recipe --config "$W/config.yaml" --runs "$W/arms" --recogniser \
    progressive_denoising/bundled/pdm-shapes/recogniser --data $W/shapes32 --num-prompts $NUM_PROMPTS \
    --device $DEVICE "${specs[@]}" --out "$OUT/scale.json" --md "$OUT/scale.md" 2>&1 | grep -v Warning | tail -n 12
# The best arm (by alignment) comes back for scoring on the CPU, in pieces under the 16 MB a returned file may have.
best=$($PY -c "
import json; rows = json.load(open('$OUT/scale.json'))
arms = {k: v for k, v in rows.items() if k in '${ARMS[*]}'}; print(max(arms, key=lambda k: arms[k]['alignment']))")
echo "best: $best"
tar czf - --exclude=vqvae -C "$W/arms/$best/seed=0" final losses.jsonl | split -b 15M - "$OUT/best-$best.tgz.part-"
for arm in "${ARMS[@]}"; do name=${arm%%|*}; cp "$W/arms/$name/seed=0/losses.jsonl" "$W/logs/losses-$name.jsonl" 2>/dev/null; done
tar czf "$OUT/results.tgz" "$W/logs" "$W/config.yaml" "$OUT"/*.txt "$OUT"/scale.* 2>/dev/null
ls -la "$OUT"
