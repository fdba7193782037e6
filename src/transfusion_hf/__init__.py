"""transfusion_hf: Transfusion (one transformer for next-token prediction and image diffusion), native to
transformers and diffusers."""

from transformers import AutoConfig, AutoModel, AutoProcessor

from .configuration_transfusion import TransfusionConfig
from .data.collator import TransfusionDataCollator
from .modeling_transfusion import TransfusionForMixedModal, TransfusionOutput, TransfusionPreTrainedModel
from .noising import TransfusionNoiser
from .pipeline_transfusion import TransfusionPipeline, TransfusionPipelineOutput
from .processing_transfusion import TransfusionProcessor, special_token_ids
from .tokenization_transfusion import train_bpe_tokenizer

# Registration makes `AutoConfig` / `AutoModel.from_pretrained` resolve `model_type="transfusion"` once imported.
AutoConfig.register("transfusion", TransfusionConfig, exist_ok=True)
AutoModel.register(TransfusionConfig, TransfusionForMixedModal, exist_ok=True)
# `AutoProcessor.from_pretrained` looks the `processor_class` that `save_pretrained` writes into processor_config.json
# up among the registered processors (unregistered, it silently returned the bare tokenizer). A folder with only a
# Transfusion config.json and a tokenizer also gets a TransfusionProcessor, with the default sizes: save the processor.
AutoProcessor.register(TransfusionConfig, TransfusionProcessor, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "TransfusionConfig",
    "TransfusionDataCollator",
    "TransfusionForMixedModal",
    "TransfusionNoiser",
    "TransfusionOutput",
    "TransfusionPipeline",
    "TransfusionPipelineOutput",
    "TransfusionPreTrainedModel",
    "TransfusionProcessor",
    "special_token_ids",
    "train_bpe_tokenizer",
]
