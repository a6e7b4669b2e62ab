"""Train a Progressive Denoising Model on a pre-tokenized data set (sections 3.2-3.3, appendix A of the paper).

    accelerate launch -m training.train_pdm --config training/configs/shapes_small.yaml --max_train_steps 2000

Every option below can be set in the YAML file and overridden on the command line (`--key value` or
`key=value`). Per batch: a stage t uniform in 1..T per example, ranks from the order, the tuple (Y^{t-1}, Z^t, Y^t)
with pseudo errors, and loss = token loss + state loss.
"""

import copy
import dataclasses
import json
import math
import os
import shutil
import sys
from typing import List, Optional, Union

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, gather_object, set_seed
from diffusers.training_utils import EMAModel
from diffusers.utils import make_image_grid
from transformers import AutoTokenizer, T5Config, get_cosine_schedule_with_warmup
from transformers.hf_argparser import HfArg

from progressive_denoising import PDMARConfig, PDMARForTextToImage, PDMConfig, PDMForTextToImage
from progressive_denoising.configuration_pdm import TEXT_POSITION_EMBEDDINGS, TOKEN_LOSS_POSITIONS, TOKEN_LOSS_WEIGHTINGS
from progressive_denoising.text_tokenizer import LEVELS, train_caption_tokenizer
from progressive_denoising.commands.base import run_script
from training import data, hub, loop, options

TRAIN_ORDERS = ("raster", "random", "quant-error", "reverse-quant-error")
# "pdm": staged masked filling (eq. 4); "ar": the autoregressive baseline, next-code loss in raster order (eq. 3).
MODEL_TYPES = {"pdm": (PDMConfig, PDMForTextToImage), "ar": (PDMARConfig, PDMARForTextToImage)}


@dataclasses.dataclass
class Options:
    # data
    dataset: Optional[str] = HfArg(default=None, help="pre-tokenized data set: a load_from_disk folder or Hub id "
                                   "with caption / codes / quant_error columns (required)")
    train_split: str = HfArg(default="train", help="split to train on")
    validation_split: Optional[str] = HfArg(default="validation", help="split for the evaluation loss and samples")
    validation_size: int = HfArg(default=0, help="examples held out of a data set without a validation split")
    max_train_examples: Optional[int] = HfArg(default=None, help="train on the first N training examples only "
                                              "(data-size studies)")
    streaming: bool = HfArg(default=False, help="read 'dataset' as a stream of parquet shards (a folder of "
                            "SPLIT-*.parquet from `pdm tokenize --shard-size`, a glob, or a Hub id): each process its "
                            "own shards, a shuffle buffer, resumed where it stopped")
    shuffle_buffer_size: int = HfArg(default=1000, help="streaming: examples shuffled together (shard order is "
                                     "shuffled too, per epoch); 0 or 1: none")
    validation_dataset: Optional[str] = HfArg(default=None, help="streaming: a small map-style validation set (a "
                                              "save_to_disk folder, parquet file(s) or Hub id; its "
                                              "'validation_split'); none: no evaluation loss")
    codebook_size: Optional[int] = HfArg(default=None, help="default: pdm_tokenization.json, else the VQ model")
    token_grid_size: Optional[List[int]] = HfArg(default=None, help="H W of the code grid; default: "
                                                 "pdm_tokenization.json, else square")
    # model: an existing PDM, or a pretrained T5 encoder, or a fresh T5 of `text_config` sizes
    model_type: str = HfArg(default="pdm", help="pdm, or ar: the KV-cached autoregressive baseline trained by the "
                            "same loop")
    model_name_or_path: Optional[str] = HfArg(default=None, help="continue an existing PDM (one of "
                                              "model_name_or_path, text_encoder, text_config)")
    text_encoder: Optional[str] = HfArg(default=None, help="a pretrained T5 encoder folder or Hub id")
    text_config: Optional[Union[dict, str]] = HfArg(default=None, help="sizes of a fresh T5 (a mapping, YAML on the "
                                                    'command line: "{d_model: 64, num_layers: 2}")')
    train_text_encoder: bool = HfArg(default=False, help="the paper freezes T5; true for a small T5 trained with "
                                     "the decoder")
    tokenizer: Optional[str] = HfArg(default=None, help="caption tokenizer; default: the model's or text encoder's")
    train_tokenizer: bool = HfArg(default=False, help="train a caption tokenizer on the training captions")
    tokenizer_vocab_size: Optional[int] = HfArg(default=None, help="every word of the captions when null")
    tokenizer_level: str = HfArg(default="word", help='or "character" (to measure what whole words bring)')
    max_caption_length: int = HfArg(default=128, help="caption tokens kept")
    text_position_embedding: Optional[str] = HfArg(default=None, help="null, input or output: absolute prompt "
                                                   "positions (PDMConfig)")
    hidden_size: int = HfArg(default=1280, help="decoder width")
    num_hidden_layers: int = HfArg(default=24, help="decoder layers")
    num_attention_heads: int = HfArg(default=20, help="decoder attention heads")
    intermediate_size: int = HfArg(default=4096, help="decoder feed-forward width")
    hidden_dropout: float = HfArg(default=0.0, help="decoder dropout")
    attention_dropout: float = HfArg(default=0.0, help="decoder attention dropout")
    vqvae: Optional[str] = HfArg(default=None, help="diffusers VQModel folder: sample images and a full pipeline "
                                 "folder")
    # stages and orders
    order: Optional[str] = HfArg(default=None, help=f"training order: {', '.join(TRAIN_ORDERS)}; default: the "
                                 "model_name_or_path model's, else quant-error")
    num_stages: Optional[int] = HfArg(default=None, help="stages T; default: the model_name_or_path model's, else 64")
    p_error: float = HfArg(default=0.3, help="probability of pseudo errors")
    token_loss_positions: str = HfArg(default="masked", help='or "stage" (the paper\'s group t); see '
                                      "ordering.build_stage_tuples")
    token_loss_weighting: str = HfArg(default="position", help="or tuple: average the token loss over each tuple "
                                      "first, so every stage weighs the same (PDMConfig)")
    caption_dropout: float = HfArg(default=0.1, help="share of captions replaced by the empty prompt (guidance)")
    known_region_share: float = HfArg(default=0.0, help="share of tuples with a random box of codes known from the "
                                      "start (editing)")
    random_mask_share: float = HfArg(default=0.0, help="share of tuples masked in a random order (token loss only, "
                                     "no state labels); below 1")
    # optimisation
    train_batch_size: int = HfArg(default=8, help="batch per process")
    max_train_steps: int = HfArg(default=1000, help="optimizer steps")
    learning_rate: float = HfArg(default=1e-4, help="peak of the cosine schedule")
    warmup_steps: int = HfArg(default=0, help="linear warm-up steps of the schedule")
    weight_decay: float = HfArg(default=0.01, help="AdamW weight decay")
    adam_beta1: float = HfArg(default=0.9, help="AdamW beta1")
    adam_beta2: float = HfArg(default=0.96, help="AdamW beta2")
    max_grad_norm: Optional[float] = HfArg(default=1.0, help="gradient clipping; null: none")
    gradient_accumulation_steps: int = HfArg(default=1, help="micro-batches per optimizer step")
    mixed_precision: Optional[str] = HfArg(default=None, help="no / fp16 / bf16; null keeps what `accelerate "
                                           "launch` says")
    ema_decay: Optional[float] = HfArg(default=None, help="diffusers EMAModel: the decay warms up as (1 + n) / "
                                       "(10 + n) to this; null: no EMA")
    gradient_checkpointing: bool = HfArg(default=False, help="recompute activations in the backward pass")
    attn_implementation: str = HfArg(default="sdpa", help="or eager: on a CPU, eager's backward is faster than "
                                     "SDPA's at small sizes")
    torch_compile: bool = HfArg(default=False, help="compile the model's training pass (captions then padded to a "
                                "multiple of 16)")
    cache_text_states: bool = HfArg(default=False, help="frozen T5 only: compute the states of each caption once")
    seed: int = HfArg(default=0, help="seeds the model, the data order and every draw of a step")
    num_workers: int = HfArg(default=0, help="data loader worker processes")
    # bookkeeping
    output_dir: str = HfArg(default="pdm-output", help="folder of the logs, checkpoints, samples and final/")
    log_with: Optional[str] = HfArg(default="tensorboard", help="Accelerate tracker; null: none")
    checkpointing_steps: int = HfArg(default=500, help="save a checkpoint every N steps")
    checkpoints_total_limit: Optional[int] = HfArg(default=3, help="checkpoints kept; null: all")
    snapshot_steps: Optional[int] = HfArg(default=None, help="also keep the (EMA) model every N steps in "
                                          "snapshots/: learning curves")
    resume_from_checkpoint: Optional[str] = HfArg(default=None, help="latest or a checkpoint folder")
    eval_steps: int = HfArg(default=500, help="evaluate and sample every N steps")
    eval_batches: int = HfArg(default=8, help="validation batches per evaluation")
    num_samples: int = HfArg(default=8, help="validation captions sampled per evaluation")
    push_to_hub: bool = HfArg(default=False, help="upload final/ at the end")
    hub_model_id: Optional[str] = HfArg(default=None, help="the Hub repository of push_to_hub")
    # LoRA (peft): train a small adapter on model_name_or_path, the base model staying as it is
    use_lora: bool = HfArg(default=False, help="train LoRA adapters only; final/ then holds the adapter alone "
                           "(pytorch_lora_weights.safetensors) and its card")
    lora_r: int = HfArg(default=8, help="rank of the LoRA matrices")
    lora_alpha: Optional[float] = HfArg(default=None, help="LoRA alpha (the change is scaled by alpha / r); "
                                        "default: lora_r")
    lora_dropout: float = HfArg(default=0.0, help="dropout on the adapters' input")
    lora_target_modules: Optional[List[str]] = HfArg(default=None, help="decoder modules to adapt, by name suffix; "
                                                     "default q_proj k_proj v_proj o_proj mlp.0 mlp.2")
    lora_text_encoder: bool = HfArg(default=False, help="also adapt the T5 encoder's attention and feed-forward")


def check_options(o):
    options.check_required(o, "dataset")
    if o.order == "learned":
        raise ValueError("option 'order': 'learned' comes from training/train_policy.py after training with a "
                         "fixed order (usually quant-error)")
    if o.order is not None:
        options.check_choice("order", o.order, TRAIN_ORDERS)
    options.check_choice("model_type", o.model_type, tuple(MODEL_TYPES))
    options.check_choice("token_loss_positions", o.token_loss_positions, TOKEN_LOSS_POSITIONS)
    options.check_choice("token_loss_weighting", o.token_loss_weighting, TOKEN_LOSS_WEIGHTINGS)
    options.check_choice("tokenizer_level", o.tokenizer_level, LEVELS)
    options.check_choice("attn_implementation", o.attn_implementation, ("sdpa", "eager"))
    if o.text_position_embedding is not None:
        options.check_choice("text_position_embedding", o.text_position_embedding, TEXT_POSITION_EMBEDDINGS)
    for name in ("p_error", "caption_dropout", "known_region_share", "random_mask_share"):
        options.check_range(name, getattr(o, name), 0.0, 1.0)
    options.check_positive(o, "train_batch_size", "max_train_steps", "num_stages", "gradient_accumulation_steps",
                           "checkpointing_steps", "eval_steps", "snapshot_steps", "max_train_examples")
    if o.random_mask_share == 1.0:
        raise ValueError("option 'random_mask_share' must be below 1: the state head learns from the other tuples only")
    if o.learning_rate <= 0:
        raise ValueError(f"option 'learning_rate' must be positive, got {o.learning_rate!r}")
    if o.ema_decay is not None:
        options.check_range("ema_decay", o.ema_decay, 0.0, 1.0)
    if o.mixed_precision is not None:
        options.check_choice("mixed_precision", o.mixed_precision, ("no", "fp16", "bf16", "fp8"))
    if sum(x is not None for x in (o.model_name_or_path, o.text_encoder, o.text_config)) != 1:
        raise ValueError("set exactly one of the options 'model_name_or_path', 'text_encoder', 'text_config'")
    check_lora_options(o)
    if o.cache_text_states and o.train_text_encoder:
        raise ValueError("option 'cache_text_states' needs a frozen text encoder (train_text_encoder: false)")
    if o.token_grid_size is not None and len(o.token_grid_size) != 2:
        raise ValueError(f"option 'token_grid_size' must be two numbers (h w), got {o.token_grid_size!r}")
    check_streaming_options(o)


def check_streaming_options(o):
    if o.shuffle_buffer_size < 0:
        raise ValueError(f"option 'shuffle_buffer_size' must be 0 or more, got {o.shuffle_buffer_size!r}")
    if not o.streaming:
        if o.validation_dataset is not None:
            raise ValueError("option 'validation_dataset' goes with 'streaming' (map-style data sets hold their "
                             "validation split)")
        return
    for name in ("max_train_examples", "validation_size"):  # both need the whole data set in hand
        if getattr(o, name):
            raise ValueError(f"option {name!r} works on map-style data only, not with 'streaming'")


def check_lora_options(o):
    if not o.use_lora:
        return
    if o.model_name_or_path is None or o.model_type != "pdm":
        raise ValueError("option 'use_lora' adapts a trained PDM: set 'model_name_or_path' (model_type pdm)")
    if o.train_text_encoder:
        raise ValueError("option 'use_lora' trains adapters only: use 'lora_text_encoder', not 'train_text_encoder'")
    if o.lora_text_encoder and o.cache_text_states:
        raise ValueError("option 'cache_text_states' needs a fixed text encoder, not 'lora_text_encoder'")
    if o.snapshot_steps:
        raise ValueError("option 'snapshot_steps' saves whole models: not with 'use_lora' (checkpoints keep the adapter)")
    options.check_positive(o, "lora_r")
    options.check_range("lora_dropout", o.lora_dropout, 0.0, 1.0)


def add_lora(model, o):
    """The adapter `default` on the model; peft leaves only its weights trainable (what the optimizer gets)."""
    from progressive_denoising.lora import DECODER_TARGET_MODULES, lora_config

    config = lora_config(r=o.lora_r, lora_alpha=o.lora_alpha, lora_dropout=o.lora_dropout,
                         target_modules=o.lora_target_modules or DECODER_TARGET_MODULES,
                         text_encoder=o.lora_text_encoder)
    model.add_adapter(config)
    trainable = sum(p.numel() for p in loop.trainable_parameters(model))
    if trainable == 0:
        raise ValueError(f"option 'lora_target_modules': {o.lora_target_modules} match no decoder module")
    print(f"LoRA: {trainable} trainable parameters of {sum(p.numel() for p in model.parameters())}")


def check_world(accelerator, o):
    if accelerator.distributed_type.value == "FSDP" and (o.ema_decay is not None or o.cache_text_states):
        raise ValueError("options 'ema_decay' and 'cache_text_states' need whole weights on every process: "
                         "use them with DDP, not FSDP")
    # On a machine without GPUs, `accelerate launch --multi_gpu` starts N processes that each think they are alone.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != accelerator.num_processes:
        raise ValueError(f"{world} processes were launched but Accelerate sees {accelerator.num_processes}: "
                         "without GPUs set ACCELERATE_USE_CPU=1 (see training/README.md)")


def local_data_options(o):
    """The data options that name a folder or a Hub id, checked as such; a glob or a parquet file is checked when the
    shards are listed (data.shard_files)."""
    def names_files(value):
        return value is not None and ("*" in value or value.endswith(".parquet"))

    return [name for name in ("dataset", "validation_dataset") if not names_files(getattr(o, name))]


def load_data(o, accelerator):
    """(train, validation or None, tokenization info): map-style splits, or with `streaming` this process's part of
    the shards as a stream (its share of the local shards checked first) and a small map-style validation set."""
    if not o.streaming:
        train, validation, info = data.load_splits(o.dataset, o.train_split, o.validation_split, o.validation_size,
                                                   o.seed)
        if o.max_train_examples is not None:
            train = train.select(range(min(o.max_train_examples, len(train))))
        needed = o.train_batch_size * accelerator.num_processes  # a last, partial batch is dropped
        if len(train) < needed:
            raise ValueError(f"option 'train_batch_size': the {len(train)} training examples fill no batch of "
                             f"{o.train_batch_size} x {accelerator.num_processes} process(es)")
        return train, validation, info
    rank, world = accelerator.process_index, accelerator.num_processes
    files = data.shard_files(o.dataset, o.train_split)
    if files is not None:
        data.check_shards(files, rank, world)
        # split_dataset_by_node gives whole shards only when they divide evenly; else every process reads them all.
        spread = "whole shards" if len(files) % world == 0 else "every shard, one example in " + str(world)
        accelerator.print(f"streaming {len(files)} shard(s) of {o.dataset} over {world} process(es): {spread} each")
    train = data.open_stream(o.dataset, o.train_split, o.seed, o.shuffle_buffer_size, rank, world)
    validation = data.load_validation(o.validation_dataset, o.validation_split) if o.validation_dataset else None
    return train, validation, data.stream_info(o.dataset, files)


def load_tokenizer(o, train, accelerator):
    """The caption tokenizer: given, found beside the model, or trained on the captions by the main process."""
    if o.train_tokenizer:
        path = os.path.join(o.output_dir, "tokenizer")
        if accelerator.is_main_process:
            if o.streaming:  # every caption, not the main process's part of the stream
                train = data.open_stream(o.dataset, o.train_split, o.seed, 0, rank=0, world_size=1)
            tokenizer = train_caption_tokenizer(data.all_captions(train), vocab_size=o.tokenizer_vocab_size,
                                                level=o.tokenizer_level)
            tokenizer.save_pretrained(path)
        accelerator.wait_for_everyone()
        return AutoTokenizer.from_pretrained(path)
    path = o.tokenizer or o.model_name_or_path or o.text_encoder
    if path is None:
        raise ValueError("option 'tokenizer' is required (or train_tokenizer: true) with 'text_config'")
    return AutoTokenizer.from_pretrained(path)


def data_geometry(o, info, train):
    """(codebook size K, token grid (h, w)) from the options, the tokenization file or the VQ model."""
    codebook_size = o.codebook_size or info.get("codebook_size")
    if codebook_size is None and o.vqvae:
        from diffusers import VQModel

        codebook_size = VQModel.load_config(o.vqvae)["num_vq_embeddings"]
    if codebook_size is None:
        raise ValueError(f"option 'codebook_size' is required: no {data.TOKENIZATION_FILE} and no vqvae")
    grid = o.token_grid_size or info.get("grid")
    num_tokens = len(next(iter(train))["codes"])  # the first example, of a data set or a stream
    if grid is None:
        side = math.isqrt(num_tokens)
        grid = (side, side)
    if grid[0] * grid[1] != num_tokens:
        raise ValueError(f"option 'token_grid_size': {grid} does not hold the {num_tokens} codes of an example")
    return int(codebook_size), (int(grid[0]), int(grid[1]))


# The new model's sizes: a run from model_name_or_path takes them from that model and ignores these.
ARCHITECTURE_OPTIONS = ("text_config", "text_position_embedding", "hidden_size", "num_hidden_layers",
                        "num_attention_heads", "intermediate_size", "hidden_dropout", "attention_dropout")


def unused_options(o):
    return ARCHITECTURE_OPTIONS if o.model_name_or_path else ()


def fill_stage_options(o):
    """`order` and `num_stages` left unset: those the model_name_or_path model was trained with (continuing it, or an
    adapter for it, with other tuples than it knows would quietly mismatch), else quant-error and 64."""
    base = {}
    if o.model_name_or_path and (o.order is None or o.num_stages is None):
        from transformers import PretrainedConfig

        base = PretrainedConfig.get_config_dict(o.model_name_or_path)[0]
    if o.order is None and base.get("training_order") == "learned":
        raise ValueError(f"option 'order' is required: {o.model_name_or_path} has the learned order, which gives no "
                         "training tuples (usually quant-error)")
    o.order = o.order or base.get("training_order") or "quant-error"
    o.num_stages = o.num_stages or base.get("num_stages") or 64


def build_model(o, tokenizer, codebook_size, grid):
    sizes = dict(hidden_size=o.hidden_size, num_hidden_layers=o.num_hidden_layers, intermediate_size=o.intermediate_size,
                 num_attention_heads=o.num_attention_heads, hidden_dropout=o.hidden_dropout,
                 attention_dropout=o.attention_dropout, codebook_size=codebook_size, token_grid_size=grid,
                 num_stages=o.num_stages, training_order=o.order, token_loss_positions=o.token_loss_positions,
                 token_loss_weighting=o.token_loss_weighting,
                 freeze_text_encoder=not o.train_text_encoder, text_position_embedding=o.text_position_embedding)
    config_class, model_class = MODEL_TYPES[o.model_type]
    if o.model_name_or_path:
        model = model_class.from_pretrained(o.model_name_or_path)
        if (model.config.codebook_size, tuple(model.config.token_grid_size)) != (codebook_size, grid):
            raise ValueError(f"option 'model_name_or_path': the model's codebook/grid differ from the data's "
                             f"{codebook_size} codes on {grid}")
        model.config.freeze_text_encoder = not o.train_text_encoder
        model.text_encoder.requires_grad_(o.train_text_encoder)
    elif o.text_encoder:
        model = model_class.from_text_encoder_pretrained(o.text_encoder, **sizes)
    else:
        text_config = T5Config(**{"vocab_size": len(tokenizer), "dropout_rate": 0.0, **o.text_config})
        model = model_class(config_class(text_config=text_config, **sizes))
    if len(tokenizer) > model.config.text_config.vocab_size:
        raise ValueError(f"option 'tokenizer': {len(tokenizer)} tokens but the T5 vocabulary has "
                         f"{model.config.text_config.vocab_size}")
    model.set_attn_implementation(o.attn_implementation)
    if o.gradient_checkpointing:  # transformers 5 calls it activation checkpointing
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    if o.use_lora:
        add_lora(model, o)
    return model


def make_loader(dataset, o, shuffle):
    # Pinned host memory makes the copy to a GPU asynchronous; workers prepare the next batches meanwhile.
    return torch.utils.data.DataLoader(dataset, batch_size=o.train_batch_size, shuffle=shuffle, drop_last=shuffle,
                                       collate_fn=data.collate, num_workers=o.num_workers,
                                       pin_memory=torch.cuda.is_available(),
                                       persistent_workers=o.num_workers > 0)


def model_inputs(model, batch, o, text, generator, device, caption_dropout):
    config = model.config
    captions = data.pick_captions(batch["caption"], generator, caption_dropout)
    if o.model_type == "ar":
        targets = {"image_tokens": batch["codes"], "token_labels": batch["codes"]}
    else:
        targets = data.stage_inputs(batch, o.order, o.num_stages, config.mask_token_id, config.codebook_size,
                                    o.p_error, generator, o.token_loss_positions, o.known_region_share,
                                    config.token_grid_size, o.random_mask_share)
    return {**targets, **text(model, captions, device)}


def generate_kwargs(o):
    return {} if o.model_type == "ar" else {"num_stages": o.num_stages, "order": o.order}


@torch.no_grad()
def evaluate(accelerator, model, loader, o, text):
    """Mean validation loss over up to `eval_batches` batches, with the same draws at every evaluation."""
    model.eval()
    raw, losses = accelerator.unwrap_model(model, keep_torch_compile=False), []
    for i, batch in zip(range(o.eval_batches), loader):
        generator = data.step_generator(o.seed + 1, accelerator.process_index, i)
        loss = model(**model_inputs(raw, batch, o, text, generator, accelerator.device, 0.0)).loss
        losses.append(accelerator.gather(loss.detach()[None]).mean().item())
    model.train()
    return sum(losses) / max(len(losses), 1)


@torch.no_grad()
def sample(accelerator, model, tokenizer, vqvae, captions, o, step):
    """Generate codes for a few validation captions; save them (and a PNG grid when a VQ model is given)."""
    raw = accelerator.unwrap_model(model, keep_torch_compile=False).eval()
    tokens = tokenizer(captions, padding=True, return_tensors="pt").to(accelerator.device)
    generator = torch.Generator(accelerator.device).manual_seed(o.seed)
    codes = raw.generate(tokens.input_ids, tokens.attention_mask, generator=generator, **generate_kwargs(o))
    raw.train()
    folder = os.path.join(o.output_dir, "samples")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"step-{step}.json"), "w") as f:
        json.dump({"captions": captions, "codes": codes.tolist()}, f)
    if vqvae is None:
        return None
    from progressive_denoising.vq import decode_codes, postprocess_images

    images = postprocess_images(decode_codes(vqvae, codes.to(vqvae.device), raw.config.token_grid_size))
    columns = max(c for c in range(1, 5) if len(images) % c == 0)  # make_image_grid needs a full grid
    grid = make_image_grid(images, rows=len(images) // columns, cols=columns)
    path = os.path.join(folder, f"step-{step}.png")
    grid.save(path)
    if o.log_with == "tensorboard":
        import numpy as np

        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")
    return path


def save_final(accelerator, model, tokenizer, vqvae, ema, o, metrics, sample_path):
    """The trained model (EMA weights when kept) + tokenizer, or a pipeline folder with a VQ model; model card."""
    state_dict = accelerator.get_state_dict(model)  # collective under FSDP: every process calls it
    if not accelerator.is_main_process:
        return None
    raw = accelerator.unwrap_model(model, keep_torch_compile=False)
    if accelerator.distributed_type.value == "FSDP":  # gathered weights into an unsharded copy
        raw = type(raw)(raw.config)
        raw.load_state_dict(state_dict)
    if ema is not None:
        ema.copy_to(loop.trainable_parameters(raw))
    raw.config.training_order, raw.config.num_stages = o.order, o.num_stages
    raw.config.token_loss_positions = o.token_loss_positions
    folder = os.path.join(o.output_dir, "final")
    if o.use_lora:
        return save_lora_final(raw, o, metrics, sample_path, folder)
    if vqvae is not None and o.model_type == "pdm":
        from progressive_denoising.pipeline_pdm import PDMPipeline

        PDMPipeline(tokenizer=tokenizer, model=raw, vqvae=vqvae).save_pretrained(folder)
    else:
        raw.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    image = None
    if sample_path:
        image = "samples.png"
        shutil.copy(sample_path, os.path.join(folder, image))
    if o.model_type == "ar":
        title, extra = "Autoregressive baseline (raster order, KV cache)", "\nNext-code training, one code per step.\n"
    else:
        title = f"PDM ({o.order} order, {o.num_stages} stages)"
        extra = (f"\nOrder `{o.order}`, T = {o.num_stages} stages, p_error = {o.p_error}, "
                 f"token loss on {o.token_loss_positions} positions, "
                 f"caption dropout = {o.caption_dropout}.\n")
    card = hub.model_card(title, o, metrics, o.dataset, o.max_train_steps, extra=extra, sample_image=image,
                          unused_options=unused_options(o))
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(card)
    if o.push_to_hub:
        hub.push_folder(folder, o.hub_model_id, f"PDM after {o.max_train_steps} steps")
    return folder


def save_lora_final(model, o, metrics, sample_path, folder):
    """final/ of a LoRA run: the adapter alone (pytorch_lora_weights.safetensors) and a card naming the base model."""
    path = model.save_lora_adapter(folder, base_model=o.model_name_or_path)
    image = None
    if sample_path:
        image = "samples.png"
        shutil.copy(sample_path, os.path.join(folder, image))
    trainable = sum(p.numel() for p in loop.trainable_parameters(model))
    extra = (f"\nA LoRA adapter (rank {o.lora_r}, alpha {o.lora_alpha or o.lora_r}, {trainable} parameters, "
             f"{os.path.getsize(path) / 1024:.0f} KiB) for the base model `{o.model_name_or_path}`:\n\n"
             "```python\npipe = PDMPipeline.from_pretrained(BASE_PIPELINE)\n"
             "pipe.load_lora_weights(THIS_FOLDER_OR_REPO)\n```\n")
    card = hub.model_card(f"LoRA adapter for {o.model_name_or_path}", o, metrics, o.dataset, o.max_train_steps,
                          extra=extra, sample_image=image, what="A LoRA adapter of a PDM",
                          unused_options=unused_options(o))
    card = card.replace("\ntags:\n", "\ntags:\n- lora\n", 1)
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(card)
    if o.push_to_hub:
        hub.push_folder(folder, o.hub_model_id, f"LoRA adapter after {o.max_train_steps} steps")
    return folder


def main(argv=None):
    o = options.parse_options(Options, argv, check=check_options)
    # Paths are checked before anything loads ("latest" and Hub ids pass: they are not local paths).
    options.check_paths(o, inputs=(*local_data_options(o), "model_name_or_path", "text_encoder", "tokenizer", "vqvae",
                                   "resume_from_checkpoint"), outputs=("output_dir",))
    accelerator = Accelerator(
        gradient_accumulation_steps=o.gradient_accumulation_steps, mixed_precision=o.mixed_precision,
        log_with=o.log_with, dynamo_backend="inductor" if o.torch_compile else None, project_config=ProjectConfiguration(project_dir=o.output_dir, logging_dir=os.path.join(o.output_dir, "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=o.seed),
    )
    check_world(accelerator, o)
    loop.warn_emulated_bf16(accelerator)
    accelerator.register_save_state_pre_hook(loop.drop_tied_copies)
    set_seed(o.seed)
    os.makedirs(o.output_dir, exist_ok=True)
    train, validation, info = load_data(o, accelerator)
    tokenizer = load_tokenizer(o, train, accelerator)
    codebook_size, grid = data_geometry(o, info, train)
    fill_stage_options(o)
    model = build_model(o, tokenizer, codebook_size, grid)
    vqvae = None
    if o.vqvae:
        from diffusers import VQModel

        vqvae = VQModel.from_pretrained(o.vqvae).to(accelerator.device).eval()
    # A compiled pass is specialised to its shapes: padding captions to a multiple of 16 tokens leaves it few.
    text = data.TextStates(tokenizer, o.max_caption_length, cache=o.cache_text_states,
                           pad_to_multiple_of=16 if o.torch_compile else None)
    # Fused: one kernel per parameter group instead of several per tensor (CPU and CUDA).
    optimizer = torch.optim.AdamW(loop.trainable_parameters(model), lr=o.learning_rate, fused=True,
                                  betas=(o.adam_beta1, o.adam_beta2), weight_decay=o.weight_decay)
    # The prepared scheduler steps once per process per update, hence the factor.
    scheduler = get_cosine_schedule_with_warmup(optimizer, o.warmup_steps * accelerator.num_processes,
                                                o.max_train_steps * accelerator.num_processes)
    eval_loader = make_loader(validation, o, shuffle=False) if validation is not None else None
    if o.streaming:  # not prepared: each process already reads its own part of the stream (data.open_stream)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        train_loader = data.StreamBatches(train, o.train_batch_size, accelerator.device, accelerator.process_index,
                                          accelerator.num_processes, gather=gather_object)
        accelerator.register_for_checkpointing(train_loader)  # where each process stands in the stream
    else:
        train_loader = make_loader(train, o, shuffle=True)
        model, optimizer, scheduler, train_loader = accelerator.prepare(model, optimizer, scheduler, train_loader)
    eval_loader = accelerator.prepare(eval_loader) if eval_loader is not None else None
    ema = None
    if o.ema_decay is not None:  # after `prepare`: the averages live where the weights do (a GPU, say)
        # diffusers' EMA warms up (decay (1 + n) / (10 + n), at most ema_decay): a short run's average does not keep
        # a large share of the random initial weights (0.999 ** 1000 = 37% with a fixed decay).
        ema = EMAModel(loop.trainable_parameters(accelerator.unwrap_model(model, keep_torch_compile=False)), decay=o.ema_decay, foreach=True)
        accelerator.register_for_checkpointing(ema)
    return train_loop(o, accelerator, model, optimizer, scheduler, train_loader, eval_loader, validation, tokenizer,
                      vqvae, text, ema)


def train_loop(o, accelerator, model, optimizer, scheduler, train_loader, eval_loader, validation, tokenizer, vqvae,
               text, ema):
    resume = loop.resolve_checkpoint(o.resume_from_checkpoint, o.output_dir)
    start, seconds_before = 0, 0.0
    if resume:
        accelerator.load_state(resume)
        start, seconds_before = loop.checkpoint_progress(resume)
        accelerator.print(f"resumed from {resume} at step {start}")
    # Training time excludes evaluation, sampling and saving, so runs with other eval settings compare fairly.
    clock = loop.TrainClock(seconds_before)
    accelerator.init_trackers("pdm", config=loop.tracker_config(o))
    log = loop.JsonlLog(os.path.join(o.output_dir, "losses.jsonl"), accelerator.is_main_process)
    write_run_info(o, accelerator)
    accum, raw = o.gradient_accumulation_steps, accelerator.unwrap_model(model, keep_torch_compile=False)
    # A stream's batches resume by themselves: its position came back with the checkpoint (load_state).
    batches = train_loader if o.streaming else loop.epoch_batches(accelerator, train_loader, start * accum)
    metrics, sample_path = {}, None
    progress = loop.progress_bar(accelerator, start, o.max_train_steps)
    model.train()
    for step in range(start + 1, o.max_train_steps + 1):
        losses = []
        clock.start()
        for micro in range(accum):
            generator = data.step_generator(o.seed, accelerator.process_index, (step - 1) * accum + micro)
            with accelerator.accumulate(model):
                inputs = model_inputs(raw, next(batches), o, text, generator, accelerator.device, o.caption_dropout)
                out = model(**inputs)
                state_loss = out.state_loss if out.state_loss is not None else torch.zeros_like(out.loss)  # AR: none
                losses.append(accelerator.reduce(torch.stack([out.loss, out.token_loss, state_loss]).detach(), "mean"))
                loop.check_finite(losses[-1][0].item(), step)
                accelerator.backward(out.loss)
                if accelerator.sync_gradients and o.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), o.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
        if ema is not None:
            ema.step(loop.trainable_parameters(raw))
        loss, token_loss, state_loss = torch.stack(losses).mean(0).tolist()
        clock.stop()
        metrics = {"loss": loss, "token_loss": token_loss, "state_loss": state_loss, "lr": scheduler.get_last_lr()[0],
                   "train_seconds": clock.seconds}
        log.write(step=step, **metrics)
        accelerator.log(metrics, step=step)
        progress.update()
        progress.set_postfix(loss=f"{loss:.3f}", lr=f"{metrics['lr']:.2e}", refresh=False)
        if step % o.eval_steps == 0 or step == o.max_train_steps:
            metrics.update(evaluate_and_sample(o, accelerator, model, eval_loader, validation, tokenizer, vqvae, text, step))
            sample_path = metrics.pop("sample_path", None) or sample_path
            if "eval_loss" in metrics:
                loop.report(accelerator, f"step {step}: eval loss {metrics['eval_loss']:.4f}")
        if o.snapshot_steps and step % o.snapshot_steps == 0 and accelerator.is_main_process:
            save_snapshot(raw, ema, os.path.join(o.output_dir, "snapshots", f"step-{step}"), clock.seconds)
        if step % o.checkpointing_steps == 0:
            path = loop.save_checkpoint(accelerator, o.output_dir, step, o.checkpoints_total_limit, clock.seconds)
            loop.report(accelerator, f"step {step}: saved {path}")
    progress.close()
    if o.streaming:
        train_loader.close()
    accelerator.wait_for_everyone()
    save_final(accelerator, model, tokenizer, vqvae, ema, o, metrics, sample_path)
    loop.finish(accelerator)
    return metrics


def save_snapshot(model, ema, folder, train_seconds):
    """The model as it would be saved now (EMA weights when kept), without optimizer state: one learning-curve point."""
    if ema is not None:
        model = copy.deepcopy(model)
        ema.copy_to(loop.trainable_parameters(model))
    model.save_pretrained(folder)
    with open(os.path.join(folder, "train_seconds.json"), "w") as f:
        json.dump({"train_seconds": train_seconds}, f)


def evaluate_and_sample(o, accelerator, model, eval_loader, validation, tokenizer, vqvae, text, step):
    results = {}
    if eval_loader is not None:
        results["eval_loss"] = evaluate(accelerator, model, eval_loader, o, text)
        accelerator.log({"eval_loss": results["eval_loss"]}, step=step)
        loop.JsonlLog(os.path.join(o.output_dir, "eval.jsonl"), accelerator.is_main_process).write(step=step, **results)
    # Sampling runs on the unwrapped model of the main process: not possible on FSDP-sharded weights.
    if o.num_samples and accelerator.is_main_process and accelerator.distributed_type.value != "FSDP":
        source = validation if validation is not None else None
        captions = [c if isinstance(c, str) else c[0] for c in source["caption"][: o.num_samples]] if source else [""]
        results["sample_path"] = sample(accelerator, model, tokenizer, vqvae, captions, o, step)
    accelerator.wait_for_everyone()
    return results


def write_run_info(o, accelerator):
    """One file per process: shows that every process took part and how many there were."""
    folder = os.path.join(o.output_dir, "processes")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"rank-{accelerator.process_index}.json"), "w") as f:
        json.dump({"process_index": accelerator.process_index, "num_processes": accelerator.num_processes,
                   "device": str(accelerator.device), "mixed_precision": accelerator.mixed_precision}, f)


if __name__ == "__main__":
    # One-line errors (exit status 2 for a bad option, 1 for a failure), a traceback with --debug.
    sys.exit(run_script(main, prog="train_pdm.py"))
