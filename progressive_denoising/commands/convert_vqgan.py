"""`pdm convert-vqgan --checkpoint last.ckpt --config model.yaml --output DIR [--dtype float32] [--overwrite]`."""

from .base import ArgumentParser, CommandError, first_line, run_command
from ..files import atomic_output, check_input_file, check_output_folder


def build_parser(prog):
    parser = ArgumentParser(prog=prog, description="Convert a taming-transformers VQGAN (Lightning checkpoint + YAML "
                                                   "config) to a diffusers VQModel saved as safetensors.")
    parser.add_argument("--checkpoint", required=True, help="taming VQGAN checkpoint (.ckpt, .pt or .safetensors)")
    parser.add_argument("--config", required=True, help="taming YAML config (model.params.ddconfig, ...)")
    parser.add_argument("--output", required=True, help="folder for VQModel.save_pretrained (safetensors)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="dtype of the saved weights")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists and is not empty")
    return parser


def run(args):
    check_input_file("--checkpoint", args.checkpoint)
    check_input_file("--config", args.config)
    check_output_folder("--output", args.output, args.overwrite)
    import torch

    from progressive_denoising.convert_vqgan import convert_taming_vqgan

    try:
        model = convert_taming_vqgan(args.checkpoint, args.config)
    except (OSError, ValueError, RuntimeError) as error:  # a missing key, a shape mismatch, an unreadable file
        message = first_line(error)
        if args.checkpoint not in message and args.config not in message:
            message = f"converting {args.checkpoint} with {args.config}: {message}"
        raise CommandError(message) from error
    model = model.to(getattr(torch, args.dtype))
    with atomic_output(args.output, folder=True) as temporary:
        model.save_pretrained(temporary, safe_serialization=True)
    config = model.config
    factor = 2 ** (len(config.block_out_channels) - 1)
    print(
        f"saved VQModel to {args.output}: f{factor}, {config.num_vq_embeddings} codes of dim {config.vq_embed_dim}, "
        f"{config.sample_size}px -> {config.sample_size // factor}x{config.sample_size // factor} tokens"
    )
    return 0


def main(argv=None, prog="pdm convert-vqgan"):
    return run_command(build_parser(prog), run, argv)
