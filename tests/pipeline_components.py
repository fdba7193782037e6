"""Tiny builders for the processor, noising and pipeline tests (like diffusers' `get_dummy_components`).

Everything is small enough for a test to build and run a pipeline in well under a second on CPU:
a byte-level BPE tokenizer trained on a few captions, a 2-layer 32-wide Llama backbone with 4-channel 4x4 latents
(patch 2, so 4 image positions), and a 2-level `AutoencoderKL` (8x8 images).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from transformers import LogitsProcessor

from transfusion_hf import TransfusionConfig, TransfusionForMixedModal
from transfusion_hf.pipeline_transfusion import TransfusionPipeline
from transfusion_hf.processing_transfusion import special_token_ids
from transfusion_hf.tokenization_transfusion import train_bpe_tokenizer

CAPTIONS = [
    "a small red circle in the top left",
    "a large blue square in the center",
    "a green triangle at the bottom right",
    "two yellow dots on a black background",
    "an orange star next to a purple ring",
]
LATENT_SIZE = 4
PATCH_SIZE = 2
NUM_PATCHES = (LATENT_SIZE // PATCH_SIZE) ** 2
MAX_POSITIONS = 128


def get_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer with `<s>`, `</s>`, `<pad>`, `<boi>`, `<eoi>`, `<image>`."""
    return train_bpe_tokenizer(CAPTIONS * 4, vocab_size=vocab_size)


def perturb_(module: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Add seeded noise to every parameter, so zero-initialised output layers give informative (non-zero) outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return module


def get_transformer(
    tokenizer,
    prediction_type: str = "epsilon",
    latent_channels: int = 4,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    latent_size: int = LATENT_SIZE,
    patch_size: int = PATCH_SIZE,
    max_position_embeddings: int = MAX_POSITIONS,
    seed: int = 0,
    max_latent_size: int | None = None,
) -> TransfusionForMixedModal:
    """A tiny `TransfusionForMixedModal` whose special ids come from `tokenizer`, in eval mode, weights perturbed."""
    config = TransfusionConfig(
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_heads,
            "max_position_embeddings": max_position_embeddings,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        latent_channels=latent_channels,
        latent_size=latent_size,
        max_latent_size=max_latent_size,
        patch_size=patch_size,
        **special_token_ids(tokenizer),
        prediction_type=prediction_type,
        timestep_embedding_dim=32,
    )
    torch.manual_seed(seed)
    model = TransfusionForMixedModal(config)
    return perturb_(model, seed).eval()


def get_vae(seed: int = 0) -> AutoencoderKL:
    """A 2-level VAE (scale factor 2): 8x8 images <-> 4-channel 4x4 latents."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=8,
    )
    return vae.eval()


def get_scheduler(prediction_type: str = "epsilon"):
    """The training/inference scheduler that fits `prediction_type` (clip_sample off: latents are not in [-1, 1])."""
    if prediction_type == "flow_prediction":
        return FlowMatchEulerDiscreteScheduler()
    return DDPMScheduler(prediction_type=prediction_type, clip_sample=False)


def get_dummy_components(prediction_type: str = "epsilon", pixel_space: bool = False, seed: int = 0) -> dict:
    """`transformer`, `scheduler`, `vae` and `tokenizer` for `TransfusionPipeline(**components)`.

    `pixel_space=True` gives a model on 3-channel 4x4 "latents" (the pixels) and no VAE.
    """
    tokenizer = get_tokenizer()
    transformer = get_transformer(tokenizer, prediction_type, latent_channels=3 if pixel_space else 4, seed=seed)
    return {
        "transformer": transformer,
        "scheduler": get_scheduler(prediction_type),
        "vae": None if pixel_space else get_vae(seed),
        "tokenizer": tokenizer,
    }


def get_pipeline(**kwargs) -> TransfusionPipeline:
    """A `TransfusionPipeline` of [`get_dummy_components`] with the progress bar off."""
    pipe = TransfusionPipeline(**get_dummy_components(**kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def get_generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


__all__ = [
    "CAPTIONS",
    "LATENT_SIZE",
    "MAX_POSITIONS",
    "NUM_PATCHES",
    "PATCH_SIZE",
    "get_dummy_components",
    "get_generator",
    "get_pipeline",
    "get_scheduler",
    "get_tokenizer",
    "get_transformer",
    "get_vae",
    "perturb_",
]


def make_pipe(components: dict, **overrides) -> TransfusionPipeline:
    """A pipeline on shared (read-only) components with its own fresh scheduler (for the transformer's prediction
    type, the overriding one when given); progress bar off."""
    prediction_type = overrides.get("transformer", components["transformer"]).config.prediction_type
    kwargs = dict(components, scheduler=get_scheduler(prediction_type))
    kwargs.update(overrides)
    pipe = TransfusionPipeline(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class ForceTokens(LogitsProcessor):
    """Forces `tokens[i]` at the i-th text step (then leaves the logits alone)."""

    def __init__(self, tokens):
        self.tokens = list(tokens)
        self.calls = 0

    def __call__(self, input_ids, scores):
        if self.calls < len(self.tokens):
            forced = torch.full_like(scores, float("-inf"))
            forced[:, self.tokens[self.calls]] = 0
            scores = forced
        self.calls += 1
        return scores


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and do not stall when the CPUs are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
