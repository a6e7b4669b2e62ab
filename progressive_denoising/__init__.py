"""progressive-denoising: the Progressive Denoising Model (PDM) for text-to-image, Hugging Face style."""

from transformers import AutoConfig, AutoModel

from .configuration_pdm import ORDERS, STATE_NAMES, PDMARConfig, PDMConfig
from .modeling_ar import PDMARForTextToImage
from .modeling_pdm import PDMForTextToImage, PDMGenerateOutput, PDMOutput
from .ordering import stage_schedule
from .pipeline_pdm import PDMPipeline, PDMPipelineOutput

__version__ = "0.1.0"

AutoConfig.register(PDMConfig.model_type, PDMConfig, exist_ok=True)
AutoConfig.register(PDMARConfig.model_type, PDMARConfig, exist_ok=True)
AutoModel.register(PDMConfig, PDMForTextToImage, exist_ok=True)
AutoModel.register(PDMARConfig, PDMARForTextToImage, exist_ok=True)
# Saved folders carry the model code and an `auto_map`, so people without this package can load them with
# `AutoModel.from_pretrained(folder_or_hub_id, trust_remote_code=True)`.
PDMConfig.register_for_auto_class()
PDMForTextToImage.register_for_auto_class("AutoModel")
PDMARConfig.register_for_auto_class()
PDMARForTextToImage.register_for_auto_class("AutoModel")

__all__ = [
    "ORDERS",
    "PDMARConfig",
    "PDMARForTextToImage",
    "STATE_NAMES",
    "PDMConfig",
    "PDMForTextToImage",
    "PDMGenerateOutput",
    "PDMOutput",
    "PDMPipeline",
    "PDMPipelineOutput",
    "stage_schedule",
]
