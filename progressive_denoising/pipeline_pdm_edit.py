"""Editing with the state head: inpainting (and outpainting), image-to-image and revise.

A PDM fills masked codes in any order and may replace codes it does not trust, so each editing pipeline is the
text-to-image loop started from the codes of an image (`generate(init_codes=..., keep_mask=...)`):

- [`PDMInpaintPipeline`]: the codes under the white part of `mask_image` are regenerated, the others are kept bit for
  bit. Outpainting is inpainting of the border that [`shift_for_outpainting`] uncovers.
- [`PDMImg2ImgPipeline`]: a share `strength` of the codes is regenerated; *which* codes is the model's choice: those
  its state head trusts least under the new prompt (highest p(replace) against p(keep)), not random ones.
- [`PDMRevisePipeline`]: the state head alone decides what to rewrite: every code it would replace under the new
  prompt (p(replace) > p(keep)), optionally only inside `mask_image`, is regenerated, and during the stages it may
  replace further codes of that region (the error recovering of section 3.3). It reports how many codes changed.

Images must have the size the model generates (its code grid times the VQ model's downsampling factor): the
pipelines do not resize. These classes need the package (they are not copied beside a saved pipeline); they load
any PDM pipeline folder: `PDMInpaintPipeline.from_pretrained(folder)` or `PDMInpaintPipeline.from_pipe(pipe)`.
"""

import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import VQModel
from diffusers.image_processor import PipelineImageInput, VaeImageProcessor
from diffusers.utils import BaseOutput
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .configuration_pdm import ArgumentError
from .ordering import scores_to_ranks
from .pipeline_pdm import PDMPipeline
from .sampling import replace_margin
from .vq import encode_to_codes


@dataclass
class PDMEditPipelineOutput(BaseOutput):
    """Output of the editing pipelines.

    Args:
        images: the edited images, in the type `output_type` asked for (as [`PDMPipelineOutput`]).
        stages: with `return_stages=True`, the image after every stage.
        edit_mask: (batch, L) bool, the codes the pipeline opened for regeneration at the start.
        changed: (batch,) long, how many codes of the result differ from the codes of the input image.
    """

    images: Union[List[PIL.Image.Image], np.ndarray, torch.Tensor]
    stages: Optional[Union[list, torch.Tensor]] = None
    edit_mask: Optional[torch.Tensor] = None
    changed: Optional[torch.Tensor] = None


def shift_for_outpainting(image: PIL.Image.Image, dx: int, dy: int) -> Tuple[PIL.Image.Image, PIL.Image.Image]:
    """(image, mask_image) for outpainting: `image` moved by (dx, dy) pixels on a canvas of its size (black where
    nothing was) and a mask that is white on the uncovered border, for [`PDMInpaintPipeline`].

    Moving right by 8 pixels (`dx=8`) asks the model to draw the 8 columns left of the scene. Shifts that are
    multiples of the code size keep every kept code aligned with a code of the original image.
    """
    width, height = image.size
    if not (isinstance(dx, int) and isinstance(dy, int)) or abs(dx) >= width or abs(dy) >= height:
        raise ValueError(f"dx and dy must be integers smaller than the image ({width}x{height}), got {dx!r}, {dy!r}")
    canvas = PIL.Image.new("RGB", (width, height))
    canvas.paste(image.convert("RGB"), (dx, dy))
    mask = PIL.Image.new("L", (width, height), 255)
    mask.paste(0, (max(dx, 0), max(dy, 0), min(width + dx, width), min(height + dy, height)))
    return canvas, mask


def two_class_split(values: torch.Tensor) -> torch.Tensor:
    """Threshold of 1-D `values` that splits them into the two groups with the largest between-group variance
    (Otsu's rule): the midpoint between the last value of the lower group and the first of the upper one."""
    ordered = values.float().sort().values
    if ordered.numel() < 2:
        return ordered.min() - 1 if ordered.numel() else torch.tensor(float("inf"))
    count = ordered.numel()
    lower = torch.arange(1, count, device=ordered.device, dtype=torch.float32)  # size of the lower group
    lower_sum = ordered.cumsum(0)[:-1]
    between = lower * (count - lower) * (lower_sum / lower - (ordered.sum() - lower_sum) / (count - lower)) ** 2
    split = int(between.argmax())
    return (ordered[split] + ordered[split + 1]) / 2


class PDMEditPipeline(PDMPipeline):
    """What the editing pipelines share: reading images and masks, the state head's verdict on an image's codes,
    and the run of the stages from given codes. Use one of its subclasses."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, vqvae: VQModel):
        super().__init__(tokenizer=tokenizer, model=model, vqvae=vqvae)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_resize=False,
                                                 do_convert_rgb=True)
        self.mask_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_resize=False,
                                                do_normalize=False, do_binarize=True, do_convert_grayscale=True)

    @property
    def image_size(self) -> Tuple[int, int]:
        """(height, width) in pixels of the images the model makes and edits."""
        height, width = self.model.config.token_grid_size
        return height * self.vae_scale_factor, width * self.vae_scale_factor

    def _preprocess(self, value, name: str, processor: VaeImageProcessor, num_prompts: int) -> torch.Tensor:
        """`value` as a (num_prompts, C, H, W) tensor, after checking its kind, size and batch."""
        kinds = (PIL.Image.Image, np.ndarray, torch.Tensor)
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(item, kinds) for item in items):
            raise ArgumentError(name, f"{name} must be a PIL image, a numpy array, a torch tensor or a list "
                                                f"of them, got {type(value).__name__}")
        try:
            tensor = processor.preprocess(value)
        except Exception as error:  # diffusers raises several kinds; name the argument
            raise ArgumentError(name, f"{name} could not be read as an image: {error}") from error
        if tuple(tensor.shape[-2:]) != self.image_size:
            raise ArgumentError(name, f"{name} must be {self.image_size[0]}x{self.image_size[1]} pixels "
                                                f"(height x width) for this model, got {tensor.shape[-2]}x{tensor.shape[-1]}")
        if tensor.shape[0] not in (1, num_prompts):
            raise ArgumentError(name, f"{name} holds {tensor.shape[0]} images for {num_prompts} prompts: "
                                                "pass one, or one per prompt")
        return tensor.expand(num_prompts, *tensor.shape[1:])

    @torch.no_grad()
    def encode_image(self, image: PipelineImageInput, num_prompts: int) -> torch.LongTensor:
        """(num_prompts, L) VQ codes of `image` (one image, or one per prompt)."""
        pixels = self._preprocess(image, "image", self.image_processor, num_prompts)
        return encode_to_codes(self.vqvae, pixels)[0].to(self._execution_device)

    def mask_to_codes(self, mask_image: PipelineImageInput, num_prompts: int) -> torch.BoolTensor:
        """(num_prompts, L) bool: a code is True (regenerated) when any of its pixels is white in `mask_image`."""
        mask = self._preprocess(mask_image, "mask_image", self.mask_processor, num_prompts)
        cells = F.max_pool2d(mask.float(), kernel_size=self.vae_scale_factor)  # (batch, 1, h, w)
        return (cells > 0.5).flatten(1).to(self._execution_device)

    @torch.no_grad()
    def replace_margin(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """(batch, L): log p(replace) - log p(keep) of the state head for every code of `codes` under the prompts;
        > 0 where the model would replace the code (section 3.3)."""
        state_logits = self.model(input_ids=input_ids, attention_mask=attention_mask, image_tokens=codes).state_logits
        return replace_margin(state_logits)

    def edit(self, prompt, image, open_codes, negative_prompt=None, generator=None, num_images_per_prompt=1,
             output_type="pil", return_stages=False, return_dict=True, callback_on_step_end=None,
             callback_on_step_end_tensor_inputs=("latents", "codes"), **run_kwargs):
        """What the editing pipelines share: check the arguments, read the image's codes, let `open_codes(codes,
        input_ids, attention_mask, num_stages)` choose `(edit_mask, keep_mask, num_stages)` (the (num_prompts, L) codes
        to regenerate, those never to write or None, the stages), then regenerate the opened codes in stages and
        format the result. The stages are never more than the codes opened: a stage that would fill nothing is
        skipped. `run_kwargs` are the generation run's arguments of [`PDMPipeline.__call__`] (`num_inference_steps`,
        `guidance_scale`, `temperature`, ...)."""
        prompts, run = self.check_inputs(prompt, negative_prompt, output_type, callback_on_step_end_tensor_inputs,
                                         **run_kwargs)
        codes = self.encode_image(image, len(prompts))
        input_ids, attention_mask = self.encode_prompt(prompts)
        edit_mask, keep_mask, num_stages = open_codes(codes, input_ids, attention_mask, run.num_stages)
        run = dataclasses.replace(run, num_stages=max(1, min(num_stages, int(edit_mask.sum(-1).max()))))
        result = self.run_stages(
            input_ids, attention_mask, run, negative_prompt, callback_on_step_end, callback_on_step_end_tensor_inputs,
            init_codes=codes.masked_fill(edit_mask, self.model.config.mask_token_id), keep_mask=keep_mask,
            generator=generator, num_images_per_prompt=num_images_per_prompt, return_stages=return_stages,
        )
        new_codes, images, stages = self.format_result(result, return_stages, output_type)
        repeats = new_codes.shape[0] // codes.shape[0]  # num_images_per_prompt
        changed = (new_codes != codes.repeat_interleave(repeats, 0)).sum(-1)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, edit_mask.repeat_interleave(repeats, 0), changed)
        return PDMEditPipelineOutput(images=images, stages=stages, edit_mask=edit_mask.repeat_interleave(repeats, 0),
                                     changed=changed)


class PDMInpaintPipeline(PDMEditPipeline):
    r"""Inpainting (and outpainting, with [`shift_for_outpainting`]) with a PDM: the codes under the white part of
    `mask_image` are generated anew for the prompt, the others are kept exactly (diffusers' convention: white =
    regenerate, black = keep). The mask is reduced to the code grid: a code is regenerated when any of its pixels is
    white. Inside the region, codes generated at one stage may be replaced at a later one (section 3.3)."""

    @torch.no_grad()
    def __call__(self, prompt: Union[str, List[str]], image: PipelineImageInput, mask_image: PipelineImageInput,
                 **kwargs):
        """Regenerate the masked part of `image` for `prompt`.

        Args:
            prompt: one prompt or a list.
            image: the image to edit (PIL, numpy in [0, 1] or torch in [-1, 1]), one or one per prompt, of the size the
                model makes (`image_size`).
            mask_image: same size; white (> 0.5) where to regenerate.
            kwargs: the arguments of [`PDMPipeline.__call__`] (`negative_prompt`, `num_inference_steps`,
                `guidance_scale`, `temperature`, `generator`, `output_type`, ...). The stages are at most the number of
                codes to fill; `max_replacements` caps the codes replaced per stage inside the region (0: error
                recovering off).

        Returns:
            [`PDMEditPipelineOutput`] (`images`, `stages`, `edit_mask`, `changed`), or a tuple
            `(images, edit_mask, changed)` when `return_dict=False`.
        """
        def open_codes(codes, input_ids, attention_mask, num_stages):
            edit_mask = self.mask_to_codes(mask_image, codes.shape[0])
            return edit_mask, ~edit_mask, num_stages

        return self.edit(prompt, image, open_codes, **kwargs)


class PDMImg2ImgPipeline(PDMEditPipeline):
    r"""Image-to-image with a PDM: a share `strength` of the image's codes is regenerated for the prompt.

    Which codes is the model's choice, not chance: one decoder pass reads the image's codes with the new prompt, and
    the codes with the highest p(replace) against p(keep) of the state head (those it trusts least) are opened, as
    many as `round(strength * L)`. The stages are `ceil(T * strength)`, as diffusers' image-to-image pipelines run
    that share of their steps. Codes not opened may still be replaced during the stages (section 3.3);
    `max_replacements=0` keeps them.
    """

    @torch.no_grad()
    def __call__(self, prompt: Union[str, List[str]], image: PipelineImageInput, strength: float = 0.5, **kwargs):
        """Regenerate a share `strength` of `image`'s codes for `prompt`.

        Args:
            prompt: one prompt or a list.
            image: the starting image, one or one per prompt, of the size the model makes.
            strength: in [0, 1]: the share of codes regenerated (0 returns the image's VQ reconstruction, 1 draws
                a new image).
            kwargs: the arguments of [`PDMPipeline.__call__`]; `num_inference_steps` is T of a full generation, of
                which `ceil(T * strength)` run; `max_replacements=0` keeps the codes not opened as they are.

        Returns:
            [`PDMEditPipelineOutput`], or a tuple `(images, edit_mask, changed)` when `return_dict=False`.
        """
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
            raise ArgumentError("strength", f"strength must be a number in [0, 1], got {strength!r}")

        def open_codes(codes, input_ids, attention_mask, num_stages):
            num_open = round(strength * codes.shape[1])
            margin = self.replace_margin(input_ids, attention_mask, codes)
            edit_mask = scores_to_ranks(-margin) < num_open  # the least trusted first, ties in position order
            return edit_mask, None, max(1, -(-num_stages * num_open // codes.shape[1]))  # ceil(T * strength)

        return self.edit(prompt, image, open_codes, **kwargs)


class PDMRevisePipeline(PDMEditPipeline):
    r"""Revise an image to follow a new prompt, rewriting only what the model itself finds wrong.

    One decoder pass reads the image's codes with the new prompt and the state head gives every code a margin
    log p(replace) - log p(keep). The codes opened are the group the model distrusts most: the upper group of a
    two-group split of the image's margins (Otsu's rule; `threshold=None`, the default), or those above a fixed
    `threshold` (0 is the paper's own decision, p(replace) > p(keep): on PDM-Shapes it finds a changed colour in a
    quarter of the images and a changed shape almost never, see the README). At most `max_edits` are opened (the most
    distrusted first), and only inside `mask_image` when one is given. The split always opens a group: on an image
    that already follows the prompt it redraws the codes the model is least sure of (mostly the object's). The opened codes are generated anew in stages, and during the stages the state head may
    replace further codes of the region (section 3.3), bounded by the paper's rule and `max_replacements`. Outside
    the region nothing is written. For example "a large blue circle" on an image of a large red circle rewrites the
    circle and leaves the background.
    """

    @torch.no_grad()
    def __call__(self, prompt: Union[str, List[str]], image: PipelineImageInput,
                 mask_image: Optional[PipelineImageInput] = None, threshold: Optional[float] = None,
                 max_edits: Optional[int] = None, **kwargs):
        """Rewrite the codes of `image` that the model finds wrong for `prompt`.

        Args:
            prompt: the new prompt, one or a list.
            image: the image to revise, one or one per prompt, of the size the model makes.
            mask_image: optional, same size: only codes with a white pixel may change (default: all codes).
            threshold: None: open the upper group of a two-group split of the margins; a number: open the codes whose
                margin log p(replace) - log p(keep) exceeds it (0: the paper's replace decision).
            max_edits: at most this many codes opened at the start, the most confident first (default: no cap).
            kwargs: the arguments of [`PDMPipeline.__call__`]; the stages are at most the number of codes opened, and
                `max_replacements` caps the codes replaced per stage inside the region (0: only the opened codes
                change).

        Returns:
            [`PDMEditPipelineOutput`]: `changed` counts the codes that differ from the image's; `edit_mask` holds the
            codes opened at the start. With nothing found wrong the image comes back as its VQ reconstruction.
        """
        if max_edits is not None and (isinstance(max_edits, bool) or not isinstance(max_edits, int) or max_edits < 0):
            raise ArgumentError("max_edits", f"max_edits must be None or an integer >= 0, got {max_edits!r}")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or not np.isfinite(threshold)):
            raise ArgumentError("threshold", f"threshold must be None or a finite number, got {threshold!r}")

        def open_codes(codes, input_ids, attention_mask, num_stages):
            region = torch.ones_like(codes, dtype=torch.bool)
            if mask_image is not None:
                region = self.mask_to_codes(mask_image, codes.shape[0])
            margin = self.replace_margin(input_ids, attention_mask, codes).masked_fill(~region, float("-inf"))
            if threshold is None:
                cuts = torch.stack([two_class_split(row[inside]) for row, inside in zip(margin, region)])
            else:
                cuts = torch.full((margin.shape[0],), float(threshold), device=margin.device)
            edit_mask = margin > cuts.to(margin.device).unsqueeze(1)
            if max_edits is not None:
                edit_mask &= scores_to_ranks(-margin) < max_edits
            return edit_mask, ~region, num_stages

        return self.edit(prompt, image, open_codes, **kwargs)
