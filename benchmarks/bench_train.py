"""Training throughput of PDM: one step = forward + backward + AdamW step, with gradient checkpointing off and on.

    python -m benchmarks.bench_train --config small --device cpu
    python -m benchmarks.bench_train --config paper --device cuda --dtype bf16 --batch-size 32

Weights and optimizer state stay in fp32 and bf16 / fp16 runs under autocast, as `training/train_pdm.py` does with
accelerate's mixed precision. Prints and writes tokens per second and the share of the matmul peak; see
benchmarks/README.md.
"""

import argparse
from contextlib import nullcontext

import torch

from benchmarks.bench_generate import (
    DTYPES,
    cross_kv_flops,
    environment,
    matmul_peak_tflops,
    model_config,
    pdm_forward_flops,
    peak_memory_mib,
    random_prompts,
    reset_peak_memory,
    resolve_device_and_dtype,
    text_encoder_flops,
    time_call,
    write_outputs,
)
from progressive_denoising import PDMForTextToImage
from progressive_denoising.ordering import build_stage_tuples, order_scores, scores_to_ranks


def train_step_flops(config, text_length: int, checkpointing: bool) -> dict:
    """FLOPs of one training example, counted analytically.

    The decoder (with its cross K/V projections and both heads) costs 3x its forward: the forward, and a backward
    of twice the forward. Gradient checkpointing reruns the forward during the backward, so it costs 4x; that
    recomputation is counted, so the share of peak says how busy the device was, not how much useful work it did
    (`model_flops` is the useful work). The frozen text encoder runs forward only. The AdamW update is not counted.
    """
    decoder = pdm_forward_flops(config, text_length, config.codebook_size + 3) + cross_kv_flops(config, text_length)
    encoder = text_encoder_flops(config.text_config, text_length)
    return {"model_flops": 3 * decoder + encoder, "hardware_flops": (4 if checkpointing else 3) * decoder + encoder}


def random_batch(config, batch_size: int, text_length: int, device) -> dict:
    """Training tuples of eq. 4 from random codes, at random stages, with pseudo errors: the real input path."""
    g = torch.Generator().manual_seed(0)
    num_tokens = config.num_image_tokens
    codes = torch.randint(0, config.codebook_size, (batch_size, num_tokens), generator=g)
    ranks = scores_to_ranks(order_scores("random", batch_size, num_tokens, generator=g))
    stages = torch.randint(1, config.num_stages + 1, (batch_size,), generator=g)
    tuples = build_stage_tuples(codes, ranks, stages, config.num_stages, config.mask_token_id, config.codebook_size,
                                p_error=0.3, generator=g)
    input_ids = random_prompts(config, batch_size, text_length, device)
    batch = {k: tuples[k].to(device) for k in ("image_tokens", "token_labels", "state_labels")}
    return dict(batch, input_ids=input_ids, attention_mask=torch.ones_like(input_ids))


def enable_checkpointing(model):
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def bench_mode(config, device, dtype, batch_size, text_length, steps, checkpointing, peak) -> dict:
    """Times `steps` training steps (after one warm-up step) of a fresh model; one result row."""
    torch.manual_seed(0)
    with torch.device(device):
        model = PDMForTextToImage(config)
    model.train()
    if checkpointing:
        enable_checkpointing(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=device.type == "cuda")
    batch = random_batch(config, batch_size, text_length, device)
    autocast = nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)

    def step():
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocations, kernel selection, AdamW state
    reset_peak_memory(device)
    seconds = time_call(step, device, steps)
    flops = {k: batch_size * v for k, v in train_step_flops(config, text_length, checkpointing).items()}
    tokens = batch_size * config.num_image_tokens
    row = {
        "gradient_checkpointing": checkpointing,
        "batch_size": batch_size,
        "seconds_per_step": seconds,
        "tokens_per_second": tokens / seconds,
        "images_per_second": batch_size / seconds,
        **flops,
        "tflops": flops["hardware_flops"] / seconds / 1e12,
        "model_tflops": flops["model_flops"] / seconds / 1e12,
        "peak_memory_mib": peak_memory_mib(device),
    }
    row["share_of_peak"] = row["tflops"] / peak
    print(f"checkpointing={checkpointing!s:<5} batch={batch_size:<4d} {seconds:8.3f} s / step", flush=True)
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def markdown_table(env: dict, rows: list) -> str:
    lines = [
        f"### Training step (forward + backward + AdamW): config `{env['config']}`, {env['device_name']}, "
        f"{env['dtype']}, matmul peak {env['matmul_peak_tflops']:.3g} TFLOP/s",
        "",
        "| gradient checkpointing | batch | s / step | image tokens / s | TFLOP/s (counted) | % of peak | "
        "useful TFLOP/s | peak mem (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {'on (4x fwd)' if r['gradient_checkpointing'] else 'off (3x fwd)'} | {r['batch_size']} | "
            f"{r['seconds_per_step']:.4g} | {r['tokens_per_second']:.4g} | {r['tflops']:.3g} | "
            f"{100 * r['share_of_peak']:.1f} | {r['model_tflops']:.3g} | {r['peak_memory_mib']:.0f} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=["paper", "small"], default="small")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="autocast dtype; default bf16 (cuda) or fp32 (cpu)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 32 (cuda) or 8 (cpu)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps, median (default 10 cuda, 3 cpu)")
    parser.add_argument("--prompt-length", type=int, default=32, help="prompt tokens S")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads; default 1 on cpu (steady on a shared machine), torch's choice on cuda")
    parser.add_argument("--out", default="", help="JSON file")
    parser.add_argument("--md", default="", help="Markdown file")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device, dtype_name, dtype = resolve_device_and_dtype(args)
    batch_size = args.batch_size or (32 if device.type == "cuda" else 8)
    steps = args.steps or (10 if device.type == "cuda" else 3)
    config = model_config(args.config)

    peak = matmul_peak_tflops(device, dtype, steps)
    print(f"matmul peak: {peak:.3g} TFLOP/s ({dtype_name})", flush=True)
    rows = [bench_mode(config, device, dtype, batch_size, args.prompt_length, steps, checkpointing, peak)
            for checkpointing in (False, True)]
    env = environment(device, dtype_name, peak, args.config)
    env.update(prompt_length=args.prompt_length, steps=steps)
    results = dict(env, results=rows)
    write_outputs(results, markdown_table(env, rows), args.out, args.md)
    return results


if __name__ == "__main__":
    main()
