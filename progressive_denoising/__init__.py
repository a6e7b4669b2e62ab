"""progressive-denoising: the Progressive Denoising Model (PDM) for text-to-image, Hugging Face style.

The public names are imported on first use (as transformers and diffusers do), so `import progressive_denoising`
and the `pdm` command's help cost no torch or transformers import. The configuration and model modules register
their classes with `AutoConfig` / `AutoModel` when they are imported; asking this package for any model or pipeline
class imports both model modules, so `AutoModel.from_pretrained(folder)` then knows PDM and the AR baseline.
"""

import importlib
import os
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# The PDM-Shapes pipeline folder that ships with the package (model, tokenizer, VQ model and recogniser).
BUNDLED_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundled", "pdm-shapes")

# public name -> module that defines it
_LAZY_NAMES = {
    "ORDERS": "configuration_pdm",
    "STATE_NAMES": "configuration_pdm",
    "PDMConfig": "configuration_pdm",
    "PDMARConfig": "configuration_pdm",
    "PDMForTextToImage": "modeling_pdm",
    "PDMGenerateOutput": "modeling_pdm",
    "PDMOutput": "modeling_pdm",
    "PDMARForTextToImage": "modeling_ar",
    "PDMPipeline": "pipeline_pdm",
    "PDMPipelineOutput": "pipeline_pdm",
    "PDMInpaintPipeline": "pipeline_pdm_edit",
    "PDMImg2ImgPipeline": "pipeline_pdm_edit",
    "PDMRevisePipeline": "pipeline_pdm_edit",
    "PDMEditPipelineOutput": "pipeline_pdm_edit",
    "shift_for_outpainting": "pipeline_pdm_edit",
    "stage_schedule": "ordering",
}
# Names whose use needs every model class registered with the Auto classes (`PDMPipeline.from_pretrained` loads its
# model through `AutoModel`).
_NEEDS_REGISTRATION = {"PDMConfig", "PDMARConfig", "PDMForTextToImage", "PDMARForTextToImage", "PDMPipeline",
                       "PDMInpaintPipeline", "PDMImg2ImgPipeline", "PDMRevisePipeline"}

__all__ = sorted([*_LAZY_NAMES, "BUNDLED_MODEL"])

if TYPE_CHECKING:  # for type checkers and IDEs; at run time `__getattr__` imports on first use
    from .configuration_pdm import ORDERS, STATE_NAMES, PDMARConfig, PDMConfig
    from .modeling_ar import PDMARForTextToImage
    from .modeling_pdm import PDMForTextToImage, PDMGenerateOutput, PDMOutput
    from .ordering import stage_schedule
    from .pipeline_pdm import PDMPipeline, PDMPipelineOutput
    from .pipeline_pdm_edit import (
        PDMEditPipelineOutput,
        PDMImg2ImgPipeline,
        PDMInpaintPipeline,
        PDMRevisePipeline,
        shift_for_outpainting,
    )


def __getattr__(name):
    module_name = _LAZY_NAMES.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name in _NEEDS_REGISTRATION:
        importlib.import_module(".modeling_ar", __name__)  # imports modeling_pdm and configuration_pdm too
    value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY_NAMES))
