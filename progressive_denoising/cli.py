"""The `pdm` command: one entry point, one sub-command per job.

Each sub-command lives in the module that does the work and exposes `main(argv)`; this file only dispatches,
so `pdm --help` stays fast (nothing heavy is imported until a sub-command runs).
"""

import importlib
import sys

COMMANDS = {
    "generate": ("progressive_denoising.commands.generate", "write images for a prompt with a PDM pipeline"),
    "convert-vqgan": ("progressive_denoising.convert_vqgan", "convert a taming-transformers VQGAN to a diffusers VQModel"),
    "tokenize": ("progressive_denoising.tokenize_data", "pre-tokenize an image-text data set into VQ codes"),
    "make-shapes": ("progressive_denoising.shapes", "render the PDM-Shapes synthetic data set"),
    "evaluate": ("progressive_denoising.evaluation", "measure prompt alignment and FID on PDM-Shapes"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: pdm <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `pdm <command> --help` for the options of one command."]
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"pdm: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest, prog=f"pdm {name}") or 0


if __name__ == "__main__":
    sys.exit(main())
