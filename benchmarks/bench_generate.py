"""Generation speed of PDM (T stages) against the autoregressive baseline (L steps with a KV cache).

    python -m benchmarks.bench_generate --config small --device cpu
    python -m benchmarks.bench_generate --config paper --device cuda --batch-sizes 1,8,32 --stages 16,64

One run measures the device's matrix-multiply peak for the dtype, then times `generate` of both models (random
weights: the cost does not depend on them) at every batch size and stage count, and writes a JSON file and a
Markdown table. See benchmarks/README.md for what every column means.

The FLOP counts, the model configurations and the timing helpers here are shared with `bench_train.py`.
"""

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import T5Config

from progressive_denoising import PDMConfig, PDMForTextToImage
from progressive_denoising.modeling_ar import PDMARForTextToImage

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# ---------------------------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------------------------


def model_config(name: str) -> PDMConfig:
    """`paper`: PDMConfig defaults (appendix A), T5-base-sized encoder. `small`: 16x16 codes, runs on a CPU."""
    if name == "paper":
        return PDMConfig()
    if name == "small":
        # L = 256 keeps the AR / PDM step ratio meaningful; the widths are what a shared 2-core CPU runs in ~1 min.
        text = T5Config(vocab_size=1024, d_model=128, d_ff=512, num_layers=2, num_heads=4, d_kv=32)
        return PDMConfig(text_config=text, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=512, codebook_size=1024, token_grid_size=(16, 16), num_stages=16)
    raise ValueError(f"unknown config {name!r}: use paper or small")


def build_model(model_class, config: PDMConfig, device, dtype):
    """Random weights, made directly on `device` (the paper model takes minutes to initialise on a CPU)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class(model_class.config_class(**config.to_dict()))
    return model.to(dtype=dtype).eval()


def random_prompts(config: PDMConfig, batch_size: int, length: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(batch_size)
    return torch.randint(3, config.text_config.vocab_size, (batch_size, length), generator=g).to(device)


# ---------------------------------------------------------------------------------------------------------------
# FLOPs, counted analytically (a multiply-add is 2 FLOPs; norms, softmax, embeddings, sampling are not counted)
# ---------------------------------------------------------------------------------------------------------------


def decoder_layer_flops(config: PDMConfig, num_keys: float, text_length: int) -> float:
    """FLOPs of one decoder layer for one query token.

    2 * (4 h^2 [self q, k, v, o] + 2 h^2 [cross q, o] + 2 h ffn [MLP]) + 4 num_keys h [self scores and values]
    + 4 S h [cross scores and values]. The cross keys and values are projected once per prompt (`cross_kv_flops`).
    """
    h, ffn = config.hidden_size, config.intermediate_size
    return 2 * (4 * h * h + 2 * h * h + 2 * h * ffn) + 4 * num_keys * h + 4 * text_length * h


def cross_kv_flops(config: PDMConfig, text_length: int) -> float:
    """Cross-attention key and value projections of one prompt, all layers: 2 * 2 S d_text h per layer."""
    return config.num_hidden_layers * 4 * text_length * config.text_config.d_model * config.hidden_size


def text_encoder_flops(text_config: T5Config, text_length: int) -> float:
    """T5 encoder forward of one prompt: per token per layer 2 (4 d inner + (2 or 3) d ffn) + 4 S inner."""
    d, inner = text_config.d_model, text_config.num_heads * text_config.d_kv
    ffn_matrices = 3 if getattr(text_config, "is_gated_act", False) else 2
    per_token = 2 * (4 * d * inner + ffn_matrices * d * text_config.d_ff) + 4 * text_length * inner
    return text_config.num_layers * text_length * per_token


def pdm_forward_flops(config: PDMConfig, text_length: int, head_outputs: int) -> float:
    """One bidirectional decoder pass over the L codes of one image (every query sees all L keys), with heads."""
    num_tokens = config.num_image_tokens
    per_token = config.num_hidden_layers * decoder_layer_flops(config, num_tokens, text_length)
    return num_tokens * (per_token + 2 * config.hidden_size * head_outputs)


def pdm_generate_flops(config: PDMConfig, num_stages: int, text_length: int, guidance: bool) -> float:
    """One image: text encoder + cross K/V once, then T full decoder passes (token head K + state head 3)."""
    per_prompt = text_encoder_flops(config.text_config, text_length) + cross_kv_flops(config, text_length)
    per_pass = pdm_forward_flops(config, text_length, config.codebook_size + 3)
    return (2 if guidance else 1) * (per_prompt + num_stages * per_pass)


def ar_generate_flops(config: PDMConfig, text_length: int, guidance: bool) -> float:
    """One image: text encoder + cross K/V once, then L one-token steps; step i attends to its i + 1 cached keys.

    Only the useful keys are counted: the static-shape cache makes SDPA read all L slots (masked), which costs
    time but is not work the model needs.
    """
    num_tokens, layers = config.num_image_tokens, config.num_hidden_layers
    per_prompt = text_encoder_flops(config.text_config, text_length) + cross_kv_flops(config, text_length)
    steps = sum(layers * decoder_layer_flops(config, i + 1, text_length) for i in range(num_tokens))
    head = num_tokens * 2 * config.hidden_size * config.codebook_size
    return (2 if guidance else 1) * (per_prompt + steps + head)


# ---------------------------------------------------------------------------------------------------------------
# Device, timing and memory
# ---------------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} torch threads)"


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    """Best achieved TFLOP/s of large square matmuls: the ceiling the models' share of peak is measured against."""
    size, calls = (8192, 10) if device.type == "cuda" else (1024, 4)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up: library loading and kernel selection
    best = float("inf")
    for _ in range(max(repeats, 3)):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            a @ b
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / calls)
    return 2 * size**3 / best / 1e12


def reset_peak_memory(device: torch.device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float:
    """GPU: peak allocated since the last reset. CPU: the process's peak RSS so far (it cannot be reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def time_call(fn, device: torch.device, repeats: int) -> float:
    """Median wall-clock seconds of `fn()` over `repeats` calls, the device synchronised around each."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measurement(model_name, steps, batch_size, seconds, flops, peak_tflops, memory_mib) -> dict:
    """One row of the results: speed, achieved TFLOP/s and its share of the matmul peak."""
    tflops = flops / seconds / 1e12
    return {
        "model": model_name,
        "steps": steps,
        "batch_size": batch_size,
        "seconds": seconds,
        "seconds_per_image": seconds / batch_size,
        "images_per_second": batch_size / seconds,
        "flops": flops,
        "tflops": tflops,
        "share_of_peak": tflops / peak_tflops,
        "peak_memory_mib": memory_mib,
    }


def environment(device: torch.device, dtype_name: str, peak_tflops: float, config_name: str) -> dict:
    return {
        "config": config_name,
        "device": str(device),
        "device_name": device_name(device),
        "dtype": dtype_name,
        "torch": torch.__version__,
        "matmul_peak_tflops": peak_tflops,
    }


def write_outputs(results: dict, markdown: str, out: str, md: str):
    print(markdown)
    if out:
        Path(out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}")
    if md:
        Path(md).write_text(markdown + "\n")
        print(f"wrote {md}")


def int_list(text: str) -> list:
    return [int(x) for x in text.split(",") if x]


def resolve_device_and_dtype(args) -> tuple:
    """Device, dtype name and dtype from the arguments; also sets the CPU thread count."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = args.threads or (1 if device.type == "cpu" else None)
    if threads:
        # The peak matmul runs with the same threads, so the share of peak compares like with like.
        torch.set_num_threads(threads)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    return device, dtype_name, DTYPES[dtype_name]


# ---------------------------------------------------------------------------------------------------------------
# Generation benchmark
# ---------------------------------------------------------------------------------------------------------------


def bench_pdm(config, device, dtype, batch_sizes, stage_counts, prompt_length, guidance_scale, repeats, peak, compile):
    model = build_model(PDMForTextToImage, config, device, dtype)
    if compile:
        model.compile_generation()
    rows = []
    for batch_size in batch_sizes:
        prompts = random_prompts(config, batch_size, prompt_length, device)
        generate = lambda stages: model.generate(prompts, num_stages=stages, guidance_scale=guidance_scale,
                                                 generator=torch.Generator(device).manual_seed(0))
        generate(min(stage_counts))  # warm-up: the kernels of a stage do not depend on the stage count
        for stages in stage_counts:
            reset_peak_memory(device)
            seconds = time_call(lambda: generate(stages), device, repeats)
            flops = batch_size * pdm_generate_flops(config, stages, prompt_length, guidance_scale != 1.0)
            rows.append(measurement("PDM", stages, batch_size, seconds, flops, peak, peak_memory_mib(device)))
            print(f"PDM  T={stages:<5d} batch={batch_size:<4d} {seconds:8.3f} s", flush=True)
    del model
    return rows


def bench_ar(config, device, dtype, batch_sizes, prompt_length, guidance_scale, repeats, peak, compile):
    model = build_model(PDMARForTextToImage, config, device, dtype)
    if compile:
        model.compile_generation()
    rows = []
    for batch_size in batch_sizes:
        prompts = random_prompts(config, batch_size, prompt_length, device)
        generate = lambda: model.generate(prompts, guidance_scale=guidance_scale,
                                          generator=torch.Generator(device).manual_seed(0))
        generate()  # warm-up
        reset_peak_memory(device)
        seconds = time_call(generate, device, repeats)
        flops = batch_size * ar_generate_flops(config, prompt_length, guidance_scale != 1.0)
        rows.append(measurement("AR", config.num_image_tokens, batch_size, seconds, flops, peak, peak_memory_mib(device)))
        print(f"AR   L={config.num_image_tokens:<5d} batch={batch_size:<4d} {seconds:8.3f} s", flush=True)
    del model
    return rows


class HostReads:
    """Counts the operators that read a tensor's value back to the host (`.item()`, `.tolist()`, `int(t)`) or give a
    tensor whose shape depends on its values (`nonzero`, boolean masking): on a GPU each one waits for the device.
    On CUDA, `torch.cuda.set_sync_debug_mode("warn")` also counts the synchronisations the device reports."""

    READS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique", "aten::_unique2")

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counts = self.counts = {}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func._schema.name
                if name in HostReads.READS:
                    counts[name] = counts.get(name, 0) + 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.device_syncs = None

    def __enter__(self):
        if torch.cuda.is_available():
            import warnings

            self._warnings = warnings.catch_warnings(record=True)
            self._caught = self._warnings.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
            self._warnings.__exit__(*exc)
            self.device_syncs = sum("synchroniz" in str(w.message) for w in self._caught)


def count_host_reads(config, device, dtype, prompt_length, guidance_scale, stage_counts) -> dict:
    """{stage count: host reads of one PDM generate call} (and the device's own count of synchronisations on CUDA):
    equal counts for every stage count mean the stage loop itself reads nothing back."""
    model = build_model(PDMForTextToImage, config, device, dtype)
    prompts = random_prompts(config, 1, prompt_length, device)
    counts = {}
    for stages in stage_counts:
        with HostReads() as reads:
            model.generate(prompts, num_stages=stages, guidance_scale=guidance_scale,
                           generator=torch.Generator(device).manual_seed(0))
        counts[stages] = dict(reads.counts, device_synchronisations=reads.device_syncs)
        print(f"host reads, T={stages}: {counts[stages]}", flush=True)
    del model
    return counts


def add_speedups(pdm_rows: list, ar_rows: list):
    """`speedup_vs_ar` on every PDM row: AR seconds / PDM seconds at the same batch size."""
    ar_seconds = {row["batch_size"]: row["seconds"] for row in ar_rows}
    for row in pdm_rows:
        row["speedup_vs_ar"] = ar_seconds[row["batch_size"]] / row["seconds"]


def markdown_table(env: dict, rows: list, title: str) -> str:
    lines = [
        f"### {title}: config `{env['config']}`, {env['device_name']}, {env['dtype']}, "
        f"matmul peak {env['matmul_peak_tflops']:.3g} TFLOP/s",
        "",
        "| model | steps | batch | s / image | images / s | TFLOP/s | % of peak | peak mem (MiB) | PDM speed-up vs AR |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        speedup = f"{r['speedup_vs_ar']:.2f}x" if "speedup_vs_ar" in r else ""
        lines.append(
            f"| {r['model']} | {r['steps']} | {r['batch_size']} | {r['seconds_per_image']:.4g} | "
            f"{r['images_per_second']:.4g} | {r['tflops']:.3g} | {100 * r['share_of_peak']:.1f} | "
            f"{r['peak_memory_mib']:.0f} | {speedup} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=["paper", "small"], default="small")
    parser.add_argument("--batch-sizes", type=int_list, default=None, help="default 1,8,32 (cuda) or 1,8 (cpu)")
    parser.add_argument("--stages", type=int_list, default=[16, 64], help="PDM stage counts T")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 (cuda) or fp32 (cpu)")
    parser.add_argument("--prompt-length", type=int, default=32, help="prompt tokens S (no padding)")
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="!= 1 doubles the batch (CFG)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per point, median (default 3 cuda, 1 cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads; default 1 on cpu (steady on a shared machine), torch's choice on cuda")
    parser.add_argument("--compile", action="store_true",
                        help="time the fast path: model.compile_generation() (CUDA graphs on cuda); warm-up compiles")
    parser.add_argument("--count-host-reads", action="store_true",
                        help="also count what one generate call reads back to the host, at every stage count")
    parser.add_argument("--out", default="", help="JSON file")
    parser.add_argument("--md", default="", help="Markdown file")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device, dtype_name, dtype = resolve_device_and_dtype(args)
    batch_sizes = args.batch_sizes or ([1, 8, 32] if device.type == "cuda" else [1, 8])
    repeats = args.repeats or (3 if device.type == "cuda" else 1)
    config = model_config(args.config)
    torch.set_grad_enabled(False)

    peak = matmul_peak_tflops(device, dtype, repeats)
    print(f"matmul peak: {peak:.3g} TFLOP/s ({dtype_name}, {device_name(device)})", flush=True)
    common = (config, device, dtype)
    pdm_rows = bench_pdm(*common, batch_sizes, args.stages, args.prompt_length, args.guidance_scale, repeats, peak,
                         args.compile)
    ar_rows = bench_ar(*common, batch_sizes, args.prompt_length, args.guidance_scale, repeats, peak, args.compile)
    add_speedups(pdm_rows, ar_rows)

    env = environment(device, dtype_name, peak, args.config)
    env.update(prompt_length=args.prompt_length, guidance_scale=args.guidance_scale, repeats=repeats,
               compiled=args.compile)
    results = dict(env, results=pdm_rows + ar_rows)
    title = "Generation, compiled (compile_generation)" if args.compile else "Generation"
    if args.guidance_scale != 1.0:
        title += f", guidance {args.guidance_scale:g}"
    markdown = markdown_table(env, pdm_rows + ar_rows, title)
    if args.count_host_reads:
        results["host_reads"] = count_host_reads(config, device, dtype, args.prompt_length, args.guidance_scale,
                                                 args.stages)
        markdown += "\n\nHost reads of one PDM `generate` call (batch 1): " + "; ".join(
            f"T = {stages}: {counts}" for stages, counts in results["host_reads"].items())
    write_outputs(results, markdown, args.out, args.md)
    return results


if __name__ == "__main__":
    main()
