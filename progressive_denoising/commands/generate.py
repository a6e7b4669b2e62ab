"""`pdm generate "prompt" [--model PIPELINE] [--lora ADAPTER [--lora-scale S]] [--steps N] [--seed S] [--out out.png]
[--stages-out stages.png]`.

The order of work: check every argument (seeds, output paths, the pipeline folder's parts, then the model's own
checks of steps, guidance, temperature, top-k and top-p against the folder's config) before loading any weights;
load; generate; decode; write every output under a temporary name and rename them into place together.
"""

import contextlib
import json
import os
import time

from .base import ArgumentParser, CommandError, UsageError, check_seed, first_line, positive_int, run_command
from .base import usage_errors
from .. import BUNDLED_MODEL
from ..files import atomic_outputs, check_distinct, check_local_or_hub, check_output_file, looks_like_hub_id

# The arguments of a generation run (`PDMGenerationConfig`) and of `PDMPipeline.__call__` that this command's flags
# set. Their values are checked once, by the generation config, whose errors carry the argument's name: the flag.
FLAGS = {
    "num_stages": "--steps", "num_inference_steps": "--steps", "guidance_scale": "--guidance-scale",
    "guidance_schedule": "--guidance-schedule", "temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p",
    "order": "--order", "num_images_per_prompt": "--num-images", "max_replacements": "--max-replacements",
}
# Where a flag left out takes its value from.
DEFAULTS_HELP = "default: the model's generation_config.json"


def add_generation_flags(parser):
    """The flags of a generation run, shared by `pdm generate` and `pdm edit`; each defaults to the model's saved
    generation defaults (`generation_config.json` in the model folder), else the package's."""
    parser.add_argument("--steps", type=int, default=None, help=f"number of stages T, 1..L ({DEFAULTS_HELP}, else "
                                                                 "the config's num_stages)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help=f"classifier-free guidance, 1 = off ({DEFAULTS_HELP}, else 1)")
    parser.add_argument("--guidance-schedule", default=None,
                        help=f"constant, or linear: from 1 at the first stage up to the scale ({DEFAULTS_HELP})")
    parser.add_argument("--temperature", type=float, default=None, help=f"sampling temperature, > 0 ({DEFAULTS_HELP}, "
                                                                        "else 1)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest codes only, 1..K "
                                                                f"({DEFAULTS_HELP})")
    parser.add_argument("--top-p", type=float, default=None,
                        help=f"sample from the nucleus of this mass, in (0, 1] ({DEFAULTS_HELP})")
    parser.add_argument("--order", default=None, help="raster, random, quant-error, reverse-quant-error or learned "
                                                      f"({DEFAULTS_HELP}, else the order the model was trained on)")
    parser.add_argument("--max-replacements", type=int, default=None,
                        help=f"cap on codes replaced per stage, 0 turns error recovering off ({DEFAULTS_HELP})")


def run_kwargs(args):
    """The generation run's flags as keyword arguments of the pipelines (None: the model's default)."""
    return dict(num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                guidance_schedule=args.guidance_schedule, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, order=args.order, max_replacements=args.max_replacements)


def stage_strip(stage_images, num_shown: int):
    """One PIL image: `num_shown` stage images side by side, evenly spaced and always ending with the last."""
    from PIL import Image

    total = len(stage_images)
    num_shown = max(1, min(num_shown, total))
    chosen = sorted({round((i + 1) * total / num_shown) - 1 for i in range(num_shown)})
    width, height = stage_images[0].size
    strip = Image.new("RGB", (width * len(chosen), height))
    for slot, index in enumerate(chosen):
        strip.paste(stage_images[index], (slot * width, 0))
    return strip


def build_parser(prog):
    parser = ArgumentParser(prog=prog, description="Generate an image from a prompt with a PDM pipeline.")
    parser.add_argument("prompt", help="the text prompt")
    parser.add_argument("--model", default=None,
                        help="pipeline folder (model_index.json, tokenizer/, model/, vqvae/) or Hub id "
                             "(default: the bundled PDM-Shapes model)")
    parser.add_argument("--negative-prompt", default=None,
                        help="prompt to guide away from (needs --guidance-scale > 1; default: the empty prompt)")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i (0..2^63-1; default 0)")
    parser.add_argument("--lora", default=None, help="a LoRA adapter for the model: a pytorch_lora_weights.safetensors "
                                                     "file, a folder holding one, or a Hub id (train_pdm --use_lora)")
    parser.add_argument("--lora-scale", type=float, default=None,
                        help="weight of the adapter's change, 0 = the base model (default 1; needs --lora)")
    add_generation_flags(parser)
    parser.add_argument("--num-images", type=int, default=1, help="images for the prompt, saved side by side")
    parser.add_argument("--out", default="out.png", help="image file to write (default out.png)")
    parser.add_argument("--stages-out", default=None, help="also write a strip of the image after chosen stages")
    parser.add_argument("--num-stages-shown", type=positive_int, default=8, help="stages in the strip (default 8)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out / --stages-out if they exist")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads for torch (default: the cores not already busy, from the load average)")
    parser.add_argument("--timings", action="store_true",
                        help="print seconds spent importing, loading, generating, decoding and saving")
    return parser


def image_extensions():
    """File extensions PIL can write."""
    from PIL import Image

    Image.init()
    return {extension for extension, format_ in Image.registered_extensions().items() if format_ in Image.SAVE}


def check_paths(args) -> bool:
    """The checks that need no torch: seeds, outputs, the pipeline folder's layout. True for a local folder."""
    check_seed("--seed", args.seed, args.num_images)
    extensions = image_extensions()
    check_output_file("--out", args.out, args.overwrite, extensions)
    if args.stages_out is not None:
        check_output_file("--stages-out", args.stages_out, args.overwrite, extensions)
        check_distinct(**{"--out": args.out, "--stages-out": args.stages_out})
    check_lora_flags(args)
    if args.model is None and not os.path.isdir(BUNDLED_MODEL):
        raise UsageError("--model", f"no bundled model at {BUNDLED_MODEL}; pass --model PATH_OR_HUB_ID")
    return check_local_or_hub("--model", model_source(args), required=("model_index.json",), what="pipeline folder")


def check_lora_flags(args):
    """--lora-scale needs --lora and a finite number; a local --lora must exist (a Hub id is fetched at load)."""
    import math

    if not hasattr(args, "lora"):  # `pdm edit` shares these checks and has no adapter flags
        return
    if args.lora_scale is not None and args.lora is None:
        raise UsageError("--lora-scale", "needs --lora: the adapter to scale")
    if args.lora_scale is not None and not math.isfinite(args.lora_scale):
        raise UsageError("--lora-scale", f"must be a finite number, got {args.lora_scale}")
    if args.lora is not None and not os.path.exists(args.lora) and not looks_like_hub_id(args.lora):
        raise UsageError("--lora", f"{args.lora} does not exist (a file, a folder or a Hub id)")


def check_lora_file(args):
    """A local --lora read before any weights load: a CommandError naming the file when it is no adapter file."""
    if getattr(args, "lora", None) is None or not os.path.exists(args.lora):
        return
    from progressive_denoising.lora import read_adapter_file, resolve_adapter_file

    try:
        read_adapter_file(resolve_adapter_file(args.lora))
    except ValueError as error:
        raise CommandError(f"--lora: {first_line(error)}") from error


def load_lora(pipe, args):
    """The adapter of --lora loaded into the pipeline at --lora-scale; a CommandError naming the file when it does
    not fit the model or cannot be read."""
    if args.lora is None:
        return
    try:
        pipe.load_lora_weights(args.lora, weight=1.0 if args.lora_scale is None else args.lora_scale)
    except (ValueError, OSError) as error:
        raise CommandError(f"--lora: {first_line(error)}") from error


def model_source(args):
    return args.model or BUNDLED_MODEL


def check_components(folder):
    """CommandError naming the file unless every component that `model_index.json` lists is there and readable."""
    index_path = os.path.join(folder, "model_index.json")
    index = read_json(index_path)
    components = [name for name, value in index.items() if not name.startswith("_") and isinstance(value, list)]
    for name in components:
        part = os.path.join(folder, name)
        if not os.path.isdir(part):
            raise CommandError(f"{part} is missing: {index_path} lists the component {name!r}")
    for name in ("model", "vqvae"):
        check_weights(os.path.join(folder, name))


def read_json(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as error:
        raise CommandError(f"{path}: cannot read it as JSON ({first_line(error)})") from error


def check_weights(folder):
    """CommandError naming the file unless `folder` has a config and safetensors weights whose headers read."""
    from safetensors import safe_open

    read_json(os.path.join(folder, "config.json"))
    weights = sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))
    if not weights:
        raise CommandError(f"{folder} has no .safetensors weights")
    for name in weights:
        path = os.path.join(folder, name)
        try:
            with safe_open(path, framework="pt"):
                pass
        except Exception as error:  # safetensors raises its own error types: a truncated or corrupt file
            raise CommandError(f"{path} is damaged ({first_line(error)})") from error


def check_model_arguments(args, config, generation_config):
    """The generation run's flags on top of the model's defaults, checked against its config (with the flags
    named)."""
    with usage_errors(FLAGS):
        generation_config.updated(
            num_stages=args.steps, order=args.order, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            guidance_scale=args.guidance_scale, guidance_schedule=args.guidance_schedule,
            max_replacements=args.max_replacements,
        ).resolved(config)
        from progressive_denoising.modeling_pdm import check_num_images

        check_num_images(args.num_images)


def choose_device(args):
    import torch

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        raise UsageError("--device", str(error)) from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device", "CUDA is not available here; pass --device cpu")
    return device


def cpu_threads(args, device):
    """torch's CPU threads for this command: --threads, else the cores that other processes leave free (None: keep
    torch's own choice, as on a GPU or with OMP_NUM_THREADS set).

    torch's OpenMP threads wait for each other after every operation: a thread on a core another process keeps busy
    holds up all the others, once per operation. Measured with the bundled model on a 2-core machine at load 5: 8.1 s
    for 16 stages with 2 threads, 0.05 s with 1.
    """
    import torch

    if args.threads is not None:
        return args.threads
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return None
    free = (os.cpu_count() or 1) - round(os.getloadavg()[0])
    return max(1, min(torch.get_num_threads(), free))


@contextlib.contextmanager
def torch_threads(count):
    """torch's thread count set to `count` for the block, and restored after it (`main` may run in-process)."""
    import torch

    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def load_config(args, local):
    """(the model's `PDMConfig`, its `PDMGenerationConfig`: the folder's `generation_config.json` or the defaults)."""
    from transformers.utils import cached_file

    from progressive_denoising.configuration_pdm import PDMConfig, PDMGenerationConfig

    source = model_source(args)
    folder, where = (os.path.join(source, "model"), {}) if local else (source, {"subfolder": "model"})
    try:
        config = PDMConfig.from_pretrained(folder, **where)
        path = cached_file(folder, PDMGenerationConfig.FILE_NAME, _raise_exceptions_for_missing_entries=False, **where)
    except Exception as error:
        if not local:
            raise CommandError(f"{source} is no local folder and could not be loaded from the Hub "
                               f"({first_line(error)})") from error
        where = os.path.join(source, "model", "config.json")
        raise CommandError(f"{where}: cannot read the model's config ({first_line(error)})") from error
    if path is None:
        return config, PDMGenerationConfig()
    try:
        return config, PDMGenerationConfig.from_file(path)
    except ValueError as error:  # the file's fault, not a flag's: named with its key
        raise CommandError(first_line(error)) from error


def load_pipeline(args, device):
    from progressive_denoising import PDMPipeline

    source = model_source(args)
    try:
        pipe = PDMPipeline.from_pretrained(source)
    except Exception as error:
        raise CommandError(f"cannot load the pipeline {source}: {first_line(error)}") from error
    return pipe.to(device)


def generate(pipe, args, clock):
    """The pipeline's output; `clock["generate"]` ends with the last stage, the rest of the call is decoding."""
    import torch

    stage_ends = []

    def note_stage_end(pipe, stage, timestep, callback_kwargs):
        stage_ends.append(time.perf_counter())
        return {}

    generators = [torch.Generator().manual_seed(args.seed + i) for i in range(args.num_images)]
    output = pipe(
        args.prompt, negative_prompt=args.negative_prompt, generator=generators, num_images_per_prompt=args.num_images,
        return_stages=args.stages_out is not None, callback_on_step_end=note_stage_end, **run_kwargs(args),
    )
    clock.lap("generate", stage_ends[-1])
    clock.lap("decode")
    return output


def save(output, args):
    images = {args.out: stage_strip(output.images, len(output.images))}
    if args.stages_out:
        images[args.stages_out] = stage_strip([stage[0] for stage in output.stages], args.num_stages_shown)
    with atomic_outputs(*images) as temporaries:
        for image, temporary in zip(images.values(), temporaries):
            image.save(temporary)
    for path in images:
        print(f"wrote {path}")


class Clock:
    """Seconds per phase of the command, for --timings."""

    def __init__(self):
        self.last, self.seconds = time.perf_counter(), {}

    def lap(self, name, now=None):
        now = time.perf_counter() if now is None else now
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.last
        self.last = now

    def report(self):
        return "timings (s): " + ", ".join(f"{name} {seconds:.3f}" for name, seconds in self.seconds.items())


def run(args):
    clock = Clock()
    local = check_paths(args)
    clock.lap("checks")
    import torch  # noqa: F401  (timed as imports: the pipeline's modules need it)
    from progressive_denoising import PDMPipeline  # noqa: F401

    clock.lap("imports")
    device = choose_device(args)
    config, generation_config = load_config(args, local)
    check_model_arguments(args, config, generation_config)
    if local:
        check_components(model_source(args))
    check_lora_file(args)
    threads = cpu_threads(args, device)
    clock.lap("checks")
    with torch_threads(threads):
        pipe = load_pipeline(args, device)
        load_lora(pipe, args)
        clock.lap("load")
        output = generate(pipe, args, clock)
    save(output, args)
    clock.lap("save")
    if args.timings:
        print(clock.report())
    return 0


def main(argv=None, prog="pdm generate"):
    return run_command(build_parser(prog), run, argv)
