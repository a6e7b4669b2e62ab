"""The `pdm` command: one entry point, one sub-command per job.

Each sub-command is a module of `progressive_denoising.commands` with `main(argv, prog)`; its parser imports only the
standard library and it imports torch, transformers or diffusers only once its arguments are checked, so
`pdm --help`, `pdm help` and `pdm <command> --help` answer at once. Errors print one line and exit with status 2
(a bad argument) or 1 (a failure while working); `--debug` (or PDM_DEBUG=1) shows the traceback instead.
"""

import atexit
import gc
import importlib
import sys

from .commands.base import DEBUG_ENV

COMMANDS = {
    "generate": ("progressive_denoising.commands.generate", "write images for a prompt with a PDM pipeline"),
    "edit": ("progressive_denoising.commands.edit", "inpaint, img2img or revise an image with a PDM pipeline"),
    "convert-vqgan": ("progressive_denoising.commands.convert_vqgan",
                      "convert a taming-transformers VQGAN to a diffusers VQModel"),
    "tokenize": ("progressive_denoising.commands.tokenize", "pre-tokenize an image-text data set into VQ codes"),
    "make-shapes": ("progressive_denoising.commands.make_shapes", "render the PDM-Shapes synthetic data set"),
    "evaluate": ("progressive_denoising.commands.evaluate", "measure prompt alignment and FID on PDM-Shapes"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: pdm [--debug] <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += [f"  {'help'.ljust(width)}  show this list, or `pdm help <command>`: the options of one command"]
    lines += ["", "Run `pdm <command> --help` for the options of one command.",
              f"--debug (or {DEBUG_ENV}=1) shows the traceback of an error."]
    return "\n".join(lines)


def _unknown(name) -> int:
    print(f"pdm: error: unknown command {name!r}; commands: {', '.join(COMMANDS)} (see pdm --help)", file=sys.stderr)
    return 2


def _skip_final_collection():
    """At exit, leave the objects the command made to the operating system instead of a last garbage collection.

    With torch, transformers and diffusers imported, the interpreter's last collection walks millions of objects:
    0.9 s of a 5 s `pdm generate` on a 2-core CPU. `gc.freeze` in an exit handler moves them out of its reach; the
    handler runs only as the process ends, so code that calls `main` in-process is unaffected until then.
    """
    global _freeze_at_exit
    if not _freeze_at_exit:
        atexit.register(gc.freeze)
        _freeze_at_exit = True


_freeze_at_exit = False


def main(argv=None):
    _skip_final_collection()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = argv[:1] == ["--debug"]  # `pdm --debug <command> ...` is `pdm <command> --debug ...`
    argv = argv[debug:]
    if not argv or argv[0] in ("-h", "--help") or argv == ["help"]:
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name == "help":  # `pdm help generate` is `pdm generate --help`
        name, rest = rest[0], ["--help"]
    if name not in COMMANDS:
        return _unknown(name)
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(["--debug"] * debug + rest, prog=f"pdm {name}") or 0


if __name__ == "__main__":
    sys.exit(main())
