"""Sequence packing end to end: a packed batch (`TransfusionDataCollator(max_sequence_length=...)`) gives the model
the same losses and predictions as the padded batch of the same pairs, for every layout and both patch encoders."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pipeline_components import CAPTIONS, get_tokenizer, perturb_  # noqa: E402
from tiny_configs import llama_text_config, tiny_config  # noqa: E402
from transfusion_hf import TransfusionForMixedModal  # noqa: E402
from transfusion_hf.data.collator import TransfusionDataCollator  # noqa: E402
from transfusion_hf.noising import TransfusionNoiser  # noqa: E402
from transfusion_hf.processing_transfusion import TransfusionProcessor, special_token_ids  # noqa: E402

# The layout of each pair: image_first_probability, and whether the pairs keep their images.
LAYOUTS = {
    "text_only": (0.0, False),
    "image_first": (1.0, True),
    "caption_first": (0.0, True),
    "mixed": (0.5, "some"),
}


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer()


def build_model(tokenizer, patch_encoder: str, attn_implementation: str = "sdpa") -> TransfusionForMixedModal:
    text_config = llama_text_config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = tiny_config(text_config, patch_encoder=patch_encoder, **special_token_ids(tokenizer))
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    # Perturbed: the zero-initialised output layers would give every image the same (zero) prediction.
    return perturb_(TransfusionForMixedModal(config), seed=1).eval()


def make_examples(layout: str, count: int = 9) -> list[dict]:
    """Pairs with captions of mixed length (1 to 3 captions joined), latents `(4, 4, 4)`."""
    generator = torch.Generator().manual_seed(0)
    keep_images = LAYOUTS[layout][1]
    examples = []
    for index in range(count):
        text = " ".join(CAPTIONS[index % len(CAPTIONS) : index % len(CAPTIONS) + 1 + index % 3])
        example = {"text": text}
        if keep_images is True or (keep_images == "some" and index % 3):
            example["latents"] = torch.randn(4, 4, 4, generator=generator)
        examples.append(example)
    return examples


def collate(tokenizer, layout: str, max_sequence_length: int | None) -> dict[str, torch.Tensor]:
    processor = TransfusionProcessor(tokenizer, image_size=4, num_image_tokens=4)
    noiser = TransfusionNoiser(
        FlowMatchEulerDiscreteScheduler(), "flow_prediction", image_first_probability=LAYOUTS[layout][0]
    )
    collator = TransfusionDataCollator(processor, noiser, seed=3, max_sequence_length=max_sequence_length)
    return collator(make_examples(layout))


@pytest.mark.parametrize("patch_encoder", ["linear", "unet"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_packed_loss_equals_padded_loss(tokenizer, layout, patch_encoder):
    model = build_model(tokenizer, patch_encoder)
    padded = collate(tokenizer, layout, None)
    length = padded["input_ids"].shape[1]
    packed = collate(tokenizer, layout, 2 * length)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # several pairs per row
    with torch.no_grad():
        expected, actual = model(**padded), model(**packed)
    for key in ("loss", "lm_loss", "diffusion_loss"):
        if layout == "text_only" and key == "diffusion_loss":
            assert actual.diffusion_loss is None and expected.diffusion_loss is None
            continue
        torch.testing.assert_close(getattr(actual, key), getattr(expected, key), rtol=1e-6, atol=1e-6, msg=key)
    if layout != "text_only":
        # Per image too, not only on average: each image has its prediction at its place in the reading order.
        timesteps = packed["timesteps"].tolist()
        order = [padded["timesteps"].tolist().index(value) for value in timesteps]
        assert len(set(timesteps)) == len(timesteps)
        torch.testing.assert_close(
            actual.diffusion_predictions, expected.diffusion_predictions[order], rtol=0, atol=1e-5
        )

    # The same rows without their restarting positions are one long sequence each: the pairs see each other.
    with torch.no_grad():
        leaked = model(**{key: value for key, value in packed.items() if key != "position_ids"})
    assert (leaked.loss - expected.loss).abs() > 1e-4


def test_packed_loss_equals_padded_loss_with_eager_attention(tokenizer):
    model = build_model(tokenizer, "linear", attn_implementation="eager")
    padded = collate(tokenizer, "mixed", None)
    packed = collate(tokenizer, "mixed", 2 * padded["input_ids"].shape[1])
    with torch.no_grad():
        torch.testing.assert_close(model(**packed).loss, model(**padded).loss, rtol=1e-6, atol=1e-6)
