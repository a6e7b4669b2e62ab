"""Convert a taming-transformers VQGAN checkpoint (+ YAML config) to a diffusers VQModel.

Same as `pdm convert-vqgan` (`progressive_denoising.commands.convert_vqgan`); the work is
`progressive_denoising.convert_vqgan`.

    python conversion/convert_taming_vqgan.py --checkpoint last.ckpt --config model.yaml --output DIR
"""

import sys

from progressive_denoising.commands.convert_vqgan import main

if __name__ == "__main__":
    sys.exit(main())
