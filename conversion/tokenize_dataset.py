"""Pre-tokenize an image-text data set into VQ codes and quantization errors.

Same as `pdm tokenize` (`progressive_denoising.commands.tokenize`); the work is `progressive_denoising.tokenize_data`.
Run it under `accelerate launch` to split the work over several GPUs or machines.

    python conversion/tokenize_dataset.py --dataset DIR_OR_HUB_ID --vqvae VQ_DIR --output OUT_DIR
"""

import sys

from progressive_denoising.commands.tokenize import main

if __name__ == "__main__":
    sys.exit(main())
