#!/usr/bin/env bash
# Speed at the paper's size on one lent GPU, in at most 8 minutes: PDM generation at 16 and 64 stages against the
# KV-cached autoregressive baseline (batch 1, 8 and 32; plain and compiled; guidance off and on), with the host
# synchronisations of one generate call counted, and the training step (bf16, gradient checkpointing off and on,
# batch sizes up to the largest that fits). JSON and Markdown for every part go into $OUT, joined in $OUT/README.md.
#
#   bash benchmarks/run_gpu.sh                                          # on the GPU (CONFIG=paper, DEVICE=cuda)
#   CONFIG=small DEVICE=cpu BATCHES=1,8 TRAIN_BATCHES="8 16" bash benchmarks/run_gpu.sh   # the same on a CPU
#
# Each part has a time limit (PART_SECONDS) so that one slow part cannot take the rest of the lease; what finished
# is kept. Run from the repository root after `pip install torch -e .`.
set -uo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-paper}
DEVICE=${DEVICE:-cuda}
BATCHES=${BATCHES:-1,8,32}
TRAIN_BATCHES=${TRAIN_BATCHES:-16 32 64 128 256}
PART_SECONDS=${PART_SECONDS:-100}
OUT=${OUT:-benchmarks/results/$CONFIG-$DEVICE}
mkdir -p "$OUT" && rm -f "$OUT"/*.json "$OUT"/*.md
DTYPE=$([ "$DEVICE" = cuda ] && echo bf16 || echo fp32)
run() {  # run NAME ARGS...: one part under the time limit; its JSON and Markdown land in $OUT/NAME.{json,md}
    local name=$1; shift
    echo "== $name"
    timeout "$PART_SECONDS" python -m "$@" --out "$OUT/$name.json" --md "$OUT/$name.md" || echo "$name: stopped ($?)"
}

python -c "import torch, platform; print(torch.__version__, platform.platform(), \
    torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" > "$OUT/environment.txt"
for guidance in 1 3; do
    run "generate-guidance$guidance" benchmarks.bench_generate --config "$CONFIG" --device "$DEVICE" --dtype "$DTYPE" \
        --batch-sizes "$BATCHES" --stages 16,64 --guidance-scale "$guidance" --count-host-reads
    run "generate-guidance$guidance-compiled" benchmarks.bench_generate --config "$CONFIG" --device "$DEVICE" \
        --dtype "$DTYPE" --batch-sizes "$BATCHES" --stages 16,64 --guidance-scale "$guidance" --compile
done
for batch in $TRAIN_BATCHES; do  # larger batches until one does not fit (or runs past the limit)
    run "train-batch$batch" benchmarks.bench_train --config "$CONFIG" --device "$DEVICE" --dtype "$DTYPE" \
        --batch-size "$batch" || break
    [ -f "$OUT/train-batch$batch.json" ] || break
done
cat "$OUT"/*.md > "$OUT/README.md" 2>/dev/null
echo "wrote $OUT/README.md"
