"""Text in, images out: a T5 tokenizer, a `PDMForTextToImage` and a `diffusers.VQModel` as a `DiffusionPipeline`.

`__call__` checks its arguments, tokenizes the prompt, runs the stages (the model's `generate`) with diffusers'
progress bar and `callback_on_step_end`, then decodes the codes with the VQ model and `VaeImageProcessor`.

A saved pipeline carries its code: a copy of this file beside `model_index.json`, the model's modules in `model/`
(transformers copies them: the model classes are registered for `AutoModel`), and a `model_index.json` that names
both (`"_class_name": ["pipeline_pdm", "PDMPipeline"]`, `"model": ["modeling_pdm", "PDMForTextToImage"]`). So
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` loads it with torch, transformers and diffusers
alone (a Hub repository after `snapshot_download`: from a Hub id diffusers fetches `model/modeling_pdm.py` but not the
modules it imports), and this file imports nothing from its own package.
"""

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, VQModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput, logging
from diffusers.utils.accelerate_utils import apply_forward_hook
from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card
from huggingface_hub import create_repo, snapshot_download
from transformers import AutoModel, PreTrainedModel, PreTrainedTokenizerBase

# "latent" is diffusers' name for output that is not decoded: here the codes (batch, L); "codes" says the same.
OUTPUT_TYPES = ("pil", "np", "pt", "latent", "codes")
UNDECODED = ("latent", "codes")
MAX_PROMPT_TOKENS = 256
# Arguments of `from_pretrained` that say where and how to download a Hub repository.
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")
# Loading arguments that diffusers applies to every component, and that the model loaded here gets too.
MODEL_LOADING_KWARGS = ("variant", "use_safetensors", "device_map", "low_cpu_mem_usage", *HUB_KWARGS)
CARD_TAGS = ["progressive-denoising", "pdm", "text-to-image", "custom_code"]

logger = logging.get_logger(__name__)


@dataclass
class PDMPipelineOutput(BaseOutput):
    """Output of [`PDMPipeline.__call__`].

    Args:
        images: `list[PIL.Image]`, a numpy array (batch, H, W, 3) in [0, 1], a torch tensor (batch, 3, H, W) in
            [0, 1], or codes (batch, L) (`"latent"` / `"codes"`), as `output_type` asked.
        stages: with `return_stages=True`, the image after each stage in the same type (not yet generated cells
            are grey), as a list with one entry per stage; for undecoded output a tensor (batch, T, L).
    """

    images: Union[List[PIL.Image.Image], np.ndarray, torch.Tensor]
    stages: Optional[Union[list, torch.Tensor]] = None


def decode_vq_codes(vqvae: VQModel, codes: torch.Tensor, grid) -> torch.Tensor:
    """Images (batch, 3, H, W), nominally in [-1, 1], of VQ codes (batch, h * w) in [0, K), row-major on `grid` (h, w).

    Takes the VQ model first so that `apply_forward_hook` can wrap it: with model CPU offload the codebook lookup then
    runs on the accelerator too, not only `vqvae.decode`.
    """
    height, width = grid
    shape = (codes.shape[0], height, width, vqvae.config.vq_embed_dim or vqvae.config.latent_channels)
    codes = codes.to(vqvae.device)
    if vqvae.config.lookup_from_codebook:  # `decode` looks the codes up itself
        return vqvae.decode(codes, force_not_quantize=True, shape=shape).sample
    latents = vqvae.quantize.get_codebook_entry(codes.flatten(), shape)  # (batch, D, h, w)
    return vqvae.decode(latents, force_not_quantize=True).sample


class PDMPipeline(DiffusionPipeline):
    r"""Text-to-image generation with a Progressive Denoising Model.

    Args:
        tokenizer: a T5 tokenizer (`</s>` appended; the empty prompt is the unconditional input).
        model: a `PDMForTextToImage`.
        vqvae: a `diffusers.VQModel` whose codebook the model's codes index; its decoder makes the pixels.
    """

    model_cpu_offload_seq = "model->vqvae"
    # The codes after a stage, under diffusers' name for what the loop carries ("latents") and under their own.
    _callback_tensor_inputs = ["latents", "codes"]

    def __init__(self, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, vqvae: VQModel):
        super().__init__()
        if vqvae.config.num_vq_embeddings != model.config.codebook_size:
            raise ValueError(
                f"vqvae has {vqvae.config.num_vq_embeddings} codes but the model's codebook_size is "
                f"{model.config.codebook_size}"
            )
        self.register_modules(tokenizer=tokenizer, model=model.eval(), vqvae=vqvae.eval())
        self.vae_scale_factor = 2 ** (len(vqvae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # -- loading and saving --------------------------------------------------------------------------------------

    @classmethod
    def load_config(cls, *args, **kwargs):
        """`model_index.json` as this class loads it: the pipeline is `cls`, and `from_pretrained` passes the model.

        A saved folder names its copies of the code (`["pipeline_pdm", "PDMPipeline"]`, `["modeling_pdm", ...]`) for
        loading without this package; diffusers would import those copies (and ask for `trust_remote_code`).
        """
        output = super().load_config(*args, **kwargs)
        config = output[0] if isinstance(output, tuple) else output
        config["_class_name"] = cls.__name__
        config["model"] = [None, None]
        return output

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs) -> "PDMPipeline":
        r"""Load a saved pipeline (a folder or a Hub id) with the classes of the package this file belongs to.

        Takes the arguments of [`DiffusionPipeline.from_pretrained`] (`dtype`, one per component as a dict too, a
        component to use instead of the saved one, the Hub's `revision`, `token`, ...). No code of the folder runs, so
        no `trust_remote_code` is needed; without this package, load the folder with
        `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`.
        """
        folder = str(pretrained_model_name_or_path)
        if not os.path.isdir(folder):
            # `DiffusionPipeline.download` would import the repository's copy of this file to list the components.
            folder = snapshot_download(folder, **{key: kwargs[key] for key in HUB_KWARGS if key in kwargs})
        if "model" not in kwargs and os.path.isdir(os.path.join(folder, "model")):
            # `AutoModel` picks PDM or the autoregressive baseline from the saved config, through the classes this
            # package registers for it; it gets the loading arguments diffusers gives every other component.
            model_kwargs = {key: kwargs[key] for key in MODEL_LOADING_KWARGS if kwargs.get(key) is not None}
            dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
            if isinstance(dtype, dict):  # one dtype per component, as diffusers takes it
                dtype = dtype.get("model", dtype.get("default", torch.float32))
            if dtype is not None:
                model_kwargs["dtype"] = dtype
            if isinstance(model_kwargs.get("device_map"), dict):  # diffusers' per-component map
                model_kwargs["device_map"] = model_kwargs["device_map"].get("model", "cpu")
            kwargs["model"] = AutoModel.from_pretrained(os.path.join(folder, "model"), **model_kwargs)
        return super().from_pretrained(folder, **kwargs)

    def save_pretrained(
        self,
        save_directory: Union[str, os.PathLike],
        safe_serialization: bool = True,
        variant: Optional[str] = None,
        max_shard_size: Optional[Union[int, str]] = None,
        push_to_hub: bool = False,
        **kwargs,
    ):
        r"""Save the components, and the code that loads them without this package.

        Beside diffusers' layout (`model_index.json`, `tokenizer/`, `model/`, `vqvae/`) the folder gets a copy of this
        file, transformers writes the model's modules into `model/` with an `auto_map`, and `model_index.json` names
        them: `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` and
        `AutoModel.from_pretrained(folder + "/model", trust_remote_code=True)` then work without this package.

        With `push_to_hub=True` the folder gets a model card (`README.md`: the one already in `save_directory`, else
        the repository's, else a new one; with this library's metadata) and is uploaded to `repo_id` (default: the
        folder's name); `token`, `private`, `commit_message` and `create_pr` as in diffusers.
        """
        model_class, config_class = type(self.model), type(self.model.config)
        # Only classes registered for an Auto class save their code. transformers registers a class that it loads
        # with `trust_remote_code`, diffusers does not: register the model's classes whatever loaded them.
        if model_class._auto_class is None:
            model_class.register_for_auto_class("AutoModel")
        if config_class._auto_class is None:
            config_class.register_for_auto_class()
        super().save_pretrained(
            save_directory, safe_serialization=safe_serialization, variant=variant, max_shard_size=max_shard_size
        )
        shutil.copyfile(__file__, os.path.join(save_directory, os.path.basename(__file__)))
        index_path = os.path.join(save_directory, self.config_name)
        with open(index_path) as f:
            index = json.load(f)
        index.pop("_name_or_path", None)  # where this pipeline was loaded from: nothing the saved folder needs
        index["_class_name"] = [os.path.splitext(os.path.basename(__file__))[0], type(self).__name__]
        index["model"] = [model_class.__module__.rsplit(".", 1)[-1], model_class.__name__]
        with open(index_path, "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")

        if push_to_hub:
            token = kwargs.pop("token", None)
            repo_id = kwargs.pop("repo_id", os.path.basename(os.path.abspath(save_directory)))
            repo_id = create_repo(repo_id, exist_ok=True, private=kwargs.pop("private", None), token=token).repo_id
            self._model_card(save_directory, repo_id, token=token).save(os.path.join(save_directory, "README.md"))
            self._upload_folder(
                save_directory, repo_id, token=token, commit_message=kwargs.pop("commit_message", None),
                create_pr=kwargs.pop("create_pr", False),
            )

    def _model_card(self, save_directory: Union[str, os.PathLike], repo_id: str, token: Optional[str] = None):
        """The model card of a saved pipeline: `save_directory`'s README.md, else the Hub repository's, else a new
        one saying how to load it; with `library_name`, `pipeline_tag` and this library's tags added where missing."""
        readme = os.path.join(save_directory, "README.md")
        # diffusers fetches only the module that model_index.json names from a model folder (model/modeling_pdm.py),
        # not the modules it imports: the snippet downloads the whole repository first.
        description = (
            "A Progressive Denoising Model (PDM) text-to-image pipeline: a T5 text encoder, a bidirectional decoder "
            "that generates VQ codes coarse to fine in stages and may replace codes it generated earlier, and a "
            "`VQModel` that decodes them. The repository carries its code:\n\n"
            "```python\nfrom diffusers import DiffusionPipeline\nfrom huggingface_hub import snapshot_download\n\n"
            f'pipe = DiffusionPipeline.from_pretrained(snapshot_download("{repo_id}"), trust_remote_code=True)\n'
            'image = pipe("a small red circle left of a large blue square").images[0]\n```'
        )
        card = load_or_create_model_card(
            readme if os.path.isfile(readme) else repo_id, token=token, is_pipeline=True, model_description=description
        )
        card = populate_model_card(card, tags=[tag for tag in CARD_TAGS if tag not in (card.data.tags or [])])
        card.data.pipeline_tag = card.data.pipeline_tag or "text-to-image"
        return card

    # -- LoRA adapters (diffusers' `LoraBaseMixin` names; the model does the work, with peft) --------------------

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict: Union[str, os.PathLike],
                          adapter_name: Optional[str] = None, weight: float = 1.0, **kwargs) -> str:
        """Load a LoRA adapter into the model (a `pytorch_lora_weights.safetensors` file, a folder holding one, or a
        Hub repository; `weight_name`, `revision`, `token`, ... as in diffusers) and make it the active adapter at
        `weight` (the adapted layers add `weight * alpha / r * B A x`); returns its name.

        An adapter of another base model (missing target modules, other shapes) or a damaged file raises a
        ValueError naming the file, and leaves the pipeline as it was.
        """
        name = self.model.load_lora_adapter(pretrained_model_name_or_path_or_dict, adapter_name=adapter_name, **kwargs)
        self.model.set_adapters([name], [weight])
        return name

    def save_lora_weights(self, save_directory: Union[str, os.PathLike], adapter_name: Optional[str] = None,
                          weight_name: str = "pytorch_lora_weights.safetensors") -> str:
        """Write the adapter `adapter_name` (default: the active one) alone to `save_directory/weight_name`; returns
        the file's path. Unlike diffusers' class method it takes the adapter from the loaded model."""
        return self.model.save_lora_adapter(save_directory, adapter_name=adapter_name, weight_name=weight_name,
                                            base_model=self.config.get("_name_or_path"))

    def set_adapters(self, adapter_names: Union[str, List[str]], adapter_weights=None):
        """Activate the named adapters together, each at its weight (1.0 by default)."""
        self.model.set_adapters(adapter_names, adapter_weights)

    def get_active_adapters(self) -> List[str]:
        return self.model.active_adapters()

    def disable_lora(self):
        """Generate with the base model alone (the adapters stay loaded): its codes bit for bit."""
        self.model.disable_adapters()

    def enable_lora(self):
        self.model.enable_adapters()

    def fuse_lora(self, lora_scale: float = 1.0, safe_fusing: bool = False, adapter_names: Optional[List[str]] = None):
        """Fold the active adapters (times `lora_scale`) into the model's weights: generation at the base model's
        speed, the codes of the unfused adapter up to float rounding."""
        self.model.fuse_lora(lora_scale=lora_scale, safe_fusing=safe_fusing, adapter_names=adapter_names)

    def unfuse_lora(self):
        self.model.unfuse_lora()

    def delete_adapters(self, adapter_names: Union[str, List[str]]):
        self.model.delete_adapters(adapter_names)

    def unload_lora_weights(self):
        """Remove every adapter: the model is the base model again, module for module (after `fuse_lora`, the
        base model with the adapter merged into its weights)."""
        self.model.unload_lora()

    # -- generation ----------------------------------------------------------------------------------------------

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def num_timesteps(self) -> int:
        """The number of stages of the current or last call."""
        return self._num_timesteps

    def check_inputs(self, prompt, negative_prompt, output_type, callback_on_step_end_tensor_inputs,
                     num_inference_steps=None, **run_kwargs):
        """(prompts as a list, the generation run's arguments) before any work: the pipeline's own arguments are
        checked here, the run's (`num_inference_steps` and the `PDMGenerationConfig` fields: guidance_scale,
        temperature, ...) by the model's generation config, starting from the model's saved defaults."""
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        try:
            run = self.model.run_config(num_stages=num_inference_steps, **run_kwargs)
        except ValueError as error:  # the model's error names the stages by its own name: use the pipeline's
            if getattr(error, "argument", None) == "num_stages":
                error.argument, error.args = "num_inference_steps", (str(error).replace("num_stages",
                                                                                        "num_inference_steps", 1),)
            raise
        if negative_prompt is not None:
            negatives = [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
            if not isinstance(negatives, (list, tuple)) or len(negatives) not in (1, len(prompts)):
                raise ValueError(
                    f"negative_prompt must be a string or a list of {len(prompts)} strings (one per prompt), "
                    f"got {len(negatives) if isinstance(negatives, (list, tuple)) else negatives!r}"
                )
            if run.guidance_scale == 1.0:
                logger.warning("negative_prompt is ignored at guidance_scale 1.0 (no guidance): pass "
                               "guidance_scale > 1 to guide away from it")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        tensor_inputs = callback_on_step_end_tensor_inputs or []
        unknown = [name for name in tensor_inputs if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs must be among {self._callback_tensor_inputs}, got {unknown}"
            )
        return list(prompts), run

    def encode_prompt(self, prompts: List[str]):
        """Token ids and attention mask (batch, S) of the prompts, on the execution device; the model runs the text
        encoder itself (once per call). Warns about words the tokenizer does not know and prompts cut to the limit."""
        max_length = min(self.tokenizer.model_max_length, MAX_PROMPT_TOKENS)
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        self._warn_unknown_words(prompts, tokens.input_ids)
        self._warn_truncated(prompts, max_length)
        device = self._execution_device
        return tokens.input_ids.to(device), tokens.attention_mask.to(device)

    def _unknown_words(self, prompt: str) -> List[str]:
        """Words of `prompt` that the tokenizer turns into its unknown token, in order, without repeats.

        The rule of `progressive_denoising.text_tokenizer.unknown_words`, written out here because this file must load
        without the package (a saved folder carries it); a test keeps the two in step.
        """
        unknown = []
        for word in prompt.split():
            ids = self.tokenizer(word, add_special_tokens=False).input_ids
            if self.tokenizer.unk_token_id in ids and word not in unknown:
                unknown.append(word)
        return unknown

    def _warn_unknown_words(self, prompts: List[str], input_ids: torch.Tensor):
        unk = self.tokenizer.unk_token_id
        if unk is None:
            return
        for prompt, ids in zip(prompts, input_ids):
            if (ids == unk).any():
                words = ", ".join(repr(word) for word in self._unknown_words(prompt))
                logger.warning(f"the tokenizer does not know {words} in the prompt {prompt!r}: they are read as "
                               f"{self.tokenizer.unk_token}, which the model cannot tell apart")

    def _warn_truncated(self, prompts: List[str], max_length: int):
        """The tokens past `max_length`, as diffusers' pipelines report them."""
        for prompt in prompts:
            ids = self.tokenizer(prompt).input_ids
            if len(ids) > max_length:
                removed = self.tokenizer.decode(ids[max_length - 1 : -1], skip_special_tokens=True)
                shown = removed if len(removed) <= 60 else removed[:60] + "..."
                logger.warning(f"the prompt {prompt[:40]!r}... has {len(ids)} tokens and the pipeline reads at most "
                               f"{max_length}: the end was cut off ({len(ids) - max_length} tokens: {shown!r})")

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Images (batch, 3, H, W) in [-1, 1] of codes (batch, L); cells still `[MASK]` are painted grey."""
        masked = codes == self.model.config.mask_token_id
        grid = self.model.config.token_grid_size
        images = apply_forward_hook(decode_vq_codes)(self.vqvae, codes.masked_fill(masked, 0), grid)
        if masked.any():
            cells = torch.nn.functional.interpolate(masked.view(-1, 1, *grid).float(), size=images.shape[-2:])
            images = images.masked_fill(cells.bool().to(images.device), 0.0)
        return images

    def _format(self, codes: torch.Tensor, output_type: str):
        if output_type in UNDECODED:
            return codes
        return self.image_processor.postprocess(self.decode_codes(codes), output_type=output_type)

    def encode_negative_prompt(self, negative_prompt, guidance_scale: float):
        """Token ids and mask of the negative prompt(s), or (None, None) where none is given or there is no guidance
        to use it (`check_inputs` warns about the latter)."""
        if negative_prompt is None or guidance_scale == 1.0:
            return None, None
        return self.encode_prompt([negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt))

    def format_result(self, result, return_stages: bool, output_type: str):
        """(codes, images, stages) of what `run_stages` returned: the final codes, them as `output_type`, and with
        `return_stages` the image after every stage (a (batch, T, L) tensor for undecoded output)."""
        codes, stages = (result.codes, result.stages) if return_stages else (result, None)
        if stages is not None and output_type not in UNDECODED:
            stages = [self._format(stages[:, t], output_type) for t in range(stages.shape[1])]
        return codes, self._format(codes, output_type), stages

    def run_stages(self, input_ids, attention_mask, run, negative_prompt=None, callback_on_step_end=None,
                   callback_on_step_end_tensor_inputs=("latents", "codes"), callback_on_stage_end=None, **generate_kwargs):
        """The model's `generate` for the resolved generation arguments `run` (from `check_inputs`), with the progress
        bar and the callbacks of `__call__`; `generate_kwargs` go to `generate` as they are (`generator`,
        `num_images_per_prompt`, `return_stages`; `init_codes` and `keep_mask` when editing)."""
        self._guidance_scale = run.guidance_scale
        self._num_timesteps = run.num_stages
        negative_ids, negative_mask = self.encode_negative_prompt(negative_prompt, run.guidance_scale)
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        with self.progress_bar(total=run.num_stages) as progress_bar:

            def on_stage_end(stage, codes):
                if callback_on_step_end is not None:
                    callback_kwargs = {name: codes for name in callback_on_step_end_tensor_inputs or ()}
                    callback_outputs = callback_on_step_end(self, stage, stage, callback_kwargs) or {}
                    # New codes under either name are where the next stage starts from.
                    codes = callback_outputs.get("latents", callback_outputs.get("codes", codes))
                if callback_on_stage_end is not None:
                    callback_on_stage_end(self, stage, codes)
                progress_bar.update()
                return codes

            # `generate` runs the model's submodules, not its `forward`, which is what an offload hook wraps: run it
            # through the hook as `VQModel.decode` is, so `enable_model_cpu_offload` moves the model first.
            return apply_forward_hook(type(self.model).generate)(
                self.model, input_ids, attention_mask, generation_config=run, negative_input_ids=negative_ids,
                negative_attention_mask=negative_mask, callback_on_stage_end=on_stage_end, **generate_kwargs,
            )

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, List[str]],
        negative_prompt: Optional[Union[str, List[str]]] = None,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        guidance_schedule: Optional[str] = None,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        order: Optional[str] = None,
        max_replacements: Optional[int] = None,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        return_stages: bool = False,
        callback_on_stage_end: Optional[Callable[["PDMPipeline", int, torch.Tensor], None]] = None,
        return_dict: bool = True,
        callback_on_step_end: Optional[
            Union[Callable[[DiffusionPipeline, int, int, Dict[str, Any]], Dict[str, Any]], PipelineCallback,
                  MultiPipelineCallbacks]
        ] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["latents", "codes"],
    ):
        """Generate images for `prompt`.

        The generation run's arguments (`num_inference_steps` to `max_replacements`) default to the model's saved
        defaults (`pipe.model.generation_config`, `model/generation_config.json`); None keeps the default.

        Args:
            prompt: one prompt or a list.
            negative_prompt: the unconditional prompt of guidance (one, or one per prompt); default the empty one.
            num_inference_steps: the number of stages T, 1..L.
            guidance_scale: classifier-free guidance; 1.0 is plain conditional sampling. `guidance_schedule`
                `"linear"` rises from 1 at the first stage to `guidance_scale` at the last.
            temperature, top_k, top_p: sampling of the codes.
            order: positions rule; by default the order the model was trained on.
            max_replacements: cap on error-recovering replacements per stage (0 = off).
            generator: a `torch.Generator` or one per image, for reproducible images.
            num_images_per_prompt: images for every prompt.
            output_type: `"pil"`, `"np"`, `"pt"`, or `"latent"` (also `"codes"`): the codes (batch, L), not decoded.
            return_stages: also return the images after every stage (figure 1 of the paper).
            callback_on_stage_end: deprecated, use `callback_on_step_end`; called as `fn(pipeline, stage, codes)`.
            return_dict: return a [`PDMPipelineOutput`] rather than a tuple.
            callback_on_step_end: called after every stage as `fn(pipeline, stage, stage, callback_kwargs)`, as in
                diffusers (PDM has no noise timesteps: the step and the "timestep" are both the stage index 0..T-1);
                `callback_kwargs` holds the tensors named in `callback_on_step_end_tensor_inputs`: the codes
                (batch, L), `[MASK]` where nothing is generated yet, as `latents` (diffusers' name) or `codes`. It
                returns a dict; new codes in it (same shape, under either name) are what the next stage starts from.
                A `PipelineCallback` works too.
            callback_on_step_end_tensor_inputs: the tensors passed to `callback_on_step_end`, among
                `_callback_tensor_inputs`.

        Returns:
            [`PDMPipelineOutput`], or a tuple `(images,)` / `(images, stages)` when `return_dict=False`.
        """
        if callback_on_stage_end is not None:
            warnings.warn(
                "`callback_on_stage_end` is deprecated and will be removed: pass `callback_on_step_end`, called as "
                "`fn(pipeline, stage, stage, {'latents': codes})`",
                FutureWarning,
                stacklevel=2,
            )
        prompts, run = self.check_inputs(
            prompt, negative_prompt, output_type, callback_on_step_end_tensor_inputs,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            guidance_schedule=guidance_schedule, temperature=temperature, top_k=top_k, top_p=top_p, order=order,
            max_replacements=max_replacements,
        )
        input_ids, attention_mask = self.encode_prompt(prompts)
        result = self.run_stages(
            input_ids, attention_mask, run, negative_prompt, callback_on_step_end, callback_on_step_end_tensor_inputs,
            callback_on_stage_end=callback_on_stage_end, num_images_per_prompt=num_images_per_prompt,
            generator=generator, return_stages=return_stages,
        )
        _, images, stages = self.format_result(result, return_stages, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,) if stages is None else (images, stages)
        return PDMPipelineOutput(images=images, stages=stages)
