"""Text in, images out: a T5 tokenizer, a `PDMForTextToImage` and a `diffusers.VQModel` in one folder.

Laid out like a diffusers pipeline: `__call__` validates its arguments, encodes the prompt, runs the stages with a
progress bar and an optional callback, then decodes the codes with the VQ model. A saved pipeline is a folder
with `model_index.json`, `tokenizer/`, `model/` and `vqvae/`; `from_pretrained` takes such a folder or a Hub id.
"""

import json
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Union

import numpy as np
import PIL.Image
import torch
from diffusers import VQModel
from diffusers.utils import BaseOutput
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .configuration_pdm import ORDERS
from .modeling_pdm import PDMForTextToImage
from .vq import decode_codes, postprocess_images

OUTPUT_TYPES = ("pil", "np", "pt", "codes")
COMPONENTS = ("tokenizer", "model", "vqvae")
MAX_PROMPT_TOKENS = 256


@dataclass
class PDMPipelineOutput(BaseOutput):
    """Output of [`PDMPipeline.__call__`].

    Args:
        images: `list[PIL.Image]`, a numpy array (batch, H, W, 3) in [0, 1], a torch tensor (batch, 3, H, W) in
            [0, 1], or codes (batch, L), as `output_type` asked.
        stages: with `return_stages=True`, the image after each stage in the same type (not yet generated cells
            are grey), as a list with one entry per stage; for `output_type="codes"` a tensor (batch, T, L).
    """

    images: Union[List[PIL.Image.Image], np.ndarray, torch.Tensor]
    stages: Optional[Union[list, torch.Tensor]] = None


class PDMPipeline:
    r"""Text-to-image generation with a Progressive Denoising Model.

    Args:
        tokenizer: a T5 tokenizer (`</s>` appended; the empty prompt is the unconditional input).
        model: a [`PDMForTextToImage`].
        vqvae: a `diffusers.VQModel` whose codebook the model's codes index; its decoder makes the pixels.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, model: PDMForTextToImage, vqvae: VQModel):
        if vqvae.config.num_vq_embeddings != model.config.codebook_size:
            raise ValueError(
                f"vqvae has {vqvae.config.num_vq_embeddings} codes but the model's codebook_size is "
                f"{model.config.codebook_size}"
            )
        self.tokenizer, self.model, self.vqvae = tokenizer, model.eval(), vqvae.eval()
        self._progress_bar_config = {}

    # -- loading, saving, moving ---------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path: str, torch_dtype: Optional[torch.dtype] = None, **hub_kwargs) -> "PDMPipeline":
        """Load a pipeline folder, or download one from the Hub by id (`hub_kwargs` go to `snapshot_download`)."""
        folder = name_or_path
        if not os.path.isdir(folder):
            from huggingface_hub import snapshot_download

            folder = snapshot_download(name_or_path, **hub_kwargs)
        missing = [name for name in COMPONENTS if not os.path.isdir(os.path.join(folder, name))]
        if missing:
            raise ValueError(f"{name_or_path} is not a PDM pipeline folder: missing sub-folder(s) {missing}")
        dtype_kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
        return cls(
            tokenizer=AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer")),
            model=PDMForTextToImage.from_pretrained(os.path.join(folder, "model"), **dtype_kwargs),
            vqvae=VQModel.from_pretrained(os.path.join(folder, "vqvae"), **dtype_kwargs),
        )

    def save_pretrained(self, save_directory: str, push_to_hub: bool = False, repo_id: Optional[str] = None, **kwargs):
        """Write `model_index.json` and the three components; optionally upload the folder to the Hub."""
        os.makedirs(save_directory, exist_ok=True)
        self.tokenizer.save_pretrained(os.path.join(save_directory, "tokenizer"))
        self.model.save_pretrained(os.path.join(save_directory, "model"))
        self.vqvae.save_pretrained(os.path.join(save_directory, "vqvae"))
        index = {"_class_name": type(self).__name__}
        for name in COMPONENTS:
            component = getattr(self, name)
            index[name] = [type(component).__module__.split(".")[0], type(component).__name__]
        with open(os.path.join(save_directory, "model_index.json"), "w") as f:
            json.dump(index, f, indent=2)
        if push_to_hub:
            from huggingface_hub import create_repo, upload_folder

            repo_id = create_repo(repo_id or os.path.basename(os.path.abspath(save_directory)), exist_ok=True, **kwargs).repo_id
            upload_folder(repo_id=repo_id, folder_path=save_directory)

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "PDMPipeline":
        """Move (and cast) the model and the VQ model, like `DiffusionPipeline.to`."""
        # diffusers warns about float32 modules whenever `dtype` is passed, even as None: pass it only when given.
        cast = {} if dtype is None else {"dtype": dtype}
        self.model.to(device=device, **cast)
        self.vqvae.to(device=device, **cast)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.device

    def set_progress_bar_config(self, **kwargs):
        """Options for the tqdm bar over stages, e.g. `disable=True`."""
        self._progress_bar_config = kwargs

    # -- generation ----------------------------------------------------------------------------------------------

    def check_inputs(self, prompt, negative_prompt, num_inference_steps, guidance_scale, num_images_per_prompt,
                     output_type, order, generator):
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        if negative_prompt is not None:
            negatives = [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
            if not isinstance(negatives, (list, tuple)) or len(negatives) not in (1, len(prompts)):
                raise ValueError(
                    f"negative_prompt must be a string or a list of {len(prompts)} strings (one per prompt), "
                    f"got {len(negatives) if isinstance(negatives, (list, tuple)) else negatives!r}"
                )
        num_tokens = self.model.config.num_image_tokens
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= num_tokens:
            raise ValueError(f"num_inference_steps must be an integer between 1 and {num_tokens}, got {num_inference_steps!r}")
        if not guidance_scale >= 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale!r}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if order is not None and order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        num_images = len(prompts) * num_images_per_prompt
        if isinstance(generator, (list, tuple)) and len(generator) != num_images:
            raise ValueError(f"generator is a list of {len(generator)} but {num_images} images are asked for")
        return list(prompts)

    def encode_prompt(self, prompts: List[str]):
        """Token ids and attention mask (batch, S) of the prompts, on the model's device."""
        max_length = min(self.tokenizer.model_max_length, MAX_PROMPT_TOKENS)
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Images (batch, 3, H, W) in [-1, 1] of codes (batch, L); cells still `[MASK]` are painted grey."""
        mask_id = self.model.config.mask_token_id
        masked = codes == mask_id
        images = decode_codes(self.vqvae, codes.masked_fill(masked, 0), self.model.config.token_grid_size)
        if masked.any():
            grid = masked.view(-1, 1, *self.model.config.token_grid_size).float()
            cells = torch.nn.functional.interpolate(grid, size=images.shape[-2:], mode="nearest").bool()
            images = images.masked_fill(cells.to(images.device), 0.0)
        return images

    def _format(self, codes: torch.Tensor, output_type: str):
        if output_type == "codes":
            return codes
        return postprocess_images(self.decode_codes(codes), output_type)

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, List[str]],
        negative_prompt: Optional[Union[str, List[str]]] = None,
        num_inference_steps: Optional[int] = None,
        guidance_scale: float = 1.0,
        temperature: float = 1.0,
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
    ):
        """Generate images for `prompt`.

        Args:
            prompt: one prompt or a list.
            negative_prompt: the unconditional prompt of guidance (one, or one per prompt); default the empty one.
            num_inference_steps: the number of stages T, 1..L; defaults to the model's `num_stages`.
            guidance_scale: classifier-free guidance; 1.0 is plain conditional sampling.
            temperature, top_k, top_p: sampling of the codes.
            order: positions rule; defaults to the order the model was trained on.
            max_replacements: cap on error-recovering replacements per stage (0 = off).
            generator: a `torch.Generator` or one per image, for reproducible images.
            num_images_per_prompt: images for every prompt.
            output_type: `"pil"`, `"np"`, `"pt"` or `"codes"`.
            return_stages: also return the images after every stage (figure 1 of the paper).
            callback_on_stage_end: called as `fn(pipeline, stage_index, codes)` after every stage.

        Returns:
            [`PDMPipelineOutput`], or a tuple `(images,)` / `(images, stages)` when `return_dict=False`.
        """
        num_inference_steps = self.model.config.num_stages if num_inference_steps is None else num_inference_steps
        prompts = self.check_inputs(prompt, negative_prompt, num_inference_steps, guidance_scale,
                                    num_images_per_prompt, output_type, order, generator)

        input_ids, attention_mask = self.encode_prompt(prompts)
        negative_ids = negative_mask = None
        if negative_prompt is not None:
            negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
            negative_ids, negative_mask = self.encode_prompt(negatives)

        progress = tqdm(total=num_inference_steps, desc="stages", **self._progress_bar_config)

        def on_stage_end(stage, codes):
            progress.update()
            if callback_on_stage_end is not None:
                callback_on_stage_end(self, stage, codes)

        result = self.model.generate(
            input_ids, attention_mask, num_stages=num_inference_steps, order=order, temperature=temperature,
            top_k=top_k, top_p=top_p, guidance_scale=guidance_scale, negative_input_ids=negative_ids,
            negative_attention_mask=negative_mask, num_images_per_prompt=num_images_per_prompt, generator=generator,
            return_stages=return_stages, max_replacements=max_replacements, callback_on_stage_end=on_stage_end,
        )
        progress.close()

        codes, stages = (result.codes, result.stages) if return_stages else (result, None)
        images = self._format(codes, output_type)
        if stages is not None and output_type != "codes":
            stages = [self._format(stages[:, t], output_type) for t in range(stages.shape[1])]
        if not return_dict:
            return (images,) if stages is None else (images, stages)
        return PDMPipelineOutput(images=images, stages=stages)
