#!/usr/bin/env bash
# Rebuild the bundled PDM-Shapes pipeline (progressive_denoising/bundled/pdm-shapes) and its evaluation from
# nothing, on a CPU. Every step is deterministic per seed; runs/ holds the intermediate artefacts.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

# 1. data: 20k train / 1k validation / 1k test scenes at 32x32
pdm make-shapes --out runs/shapes32 --num-train 20000 --num-validation 1000 --num-test 1000 --seed 0 --size 32
# 2. image tokenizer: 8x8 codes, 256 codes
python training/train_vqvae.py --data runs/shapes32 --output runs/vq32 --resolution 32 --steps 2500 --batch_size 64 \
    --lr 1e-3 --block_out_channels 16,32,64 --norm_num_groups 8 --num_codes 256 --foreground_weight 10 \
    --log_every 100 --max_eval_images 1000 --seed 0
# 3. codes and quantization errors of the training images
pdm tokenize --dataset runs/shapes32 --split train --vqvae runs/vq32 --output runs/shapes32-codes --batch_size 256 --overwrite
# 4. the PDM (tokenizer + jointly trained T5 + decoder); writes a pipeline folder to runs/pdm-shapes32/final
python training/train_pdm.py --config training/configs/shapes32_cpu.yaml
# 4b. 2000 more steps from those weights (a second cosine cycle at half the learning rate)
python training/train_pdm.py --config training/configs/shapes32_cpu.yaml model_name_or_path=runs/pdm-shapes32/final/model \
    tokenizer=runs/pdm-shapes32/final/tokenizer text_config=null train_tokenizer=false max_steps=2000 \
    learning_rate=5e-4 warmup_steps=100 output_dir=runs/pdm-shapes32-b
# 5. the attribute recogniser used by `pdm evaluate`
pdm evaluate --train-recogniser --out runs/recogniser32 --size 32 --num-scenes 20000 --steps 2500 --seed 0
# 6. bundle
rm -rf progressive_denoising/bundled/pdm-shapes
mkdir -p progressive_denoising/bundled
cp -r runs/pdm-shapes32-b/final progressive_denoising/bundled/pdm-shapes
cp -r runs/recogniser32 progressive_denoising/bundled/pdm-shapes/recogniser
# the package's own classes load the bundle: drop the remote-code copies that save_pretrained writes beside the weights
rm progressive_denoising/bundled/pdm-shapes/model/*.py
python - <<'PY'
import json
path = "progressive_denoising/bundled/pdm-shapes/model/config.json"
config = json.load(open(path))
config.pop("auto_map", None)
json.dump(config, open(path, "w"), indent=2, sort_keys=True)
PY
