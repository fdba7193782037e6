"""The text-conditioning gap: ~0 for a model that cannot read the text, clearly > 0 for one that draws what it says."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from pipeline_components import get_tokenizer, get_transformer
from transfusion_hf.noising import TransfusionNoiser
from transfusion_hf.processing_transfusion import TransfusionProcessor, pad_sequences, special_token_ids
from transfusion_hf.training import text_conditioning_gap
from transfusion_hf.training.conditioning import derangement_partner

# Two captions of the same token length, each naming a flat image: -1 (black) or +1 (white) everywhere.
CAPTIONS = ["a red circle", "a blue circle"]


@pytest.fixture(scope="module")
def setup():
    tokenizer = get_tokenizer()
    lengths = {len(tokenizer(caption)["input_ids"]) for caption in CAPTIONS}
    assert len(lengths) == 1, "the two captions must have the same token length"
    model = get_transformer(tokenizer, "flow_prediction", seed=0).train()
    processor = TransfusionProcessor(tokenizer, image_size=4, num_image_tokens=model.config.num_patches)
    noiser = TransfusionNoiser(FlowMatchEulerDiscreteScheduler(), "flow_prediction")
    captions = [CAPTIONS[index % 2] for index in range(32)]
    clean = torch.stack([torch.full((4, 4, 4), -1.0 if index % 2 == 0 else 1.0) for index in range(32)])
    return tokenizer, model, processor, noiser, captions, clean


def train_steps(model, processor, noiser, captions, clean, steps: int) -> None:
    """Caption -> image training on the two flat images (fixed seed)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    sequences = [processor.encode_parts([caption, None], add_bos=True, add_eos=True) for caption in captions]
    input_ids, attention_mask = pad_sequences(sequences, processor.tokenizer.pad_token_id, "right")
    for _ in range(steps):
        timesteps = torch.rand(len(captions), generator=generator) * 1000
        noised = noiser.add_noise(clean, timesteps, generator)
        output = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            latents=noised.latents,
            timesteps=noised.timesteps,
            diffusion_targets=noised.targets,
        )
        output.diffusion_loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_a_model_that_cannot_read_the_text_has_no_gap(setup):
    """Every text token embedded alike: the captions (of equal length) look the same to the model, so the losses
    with the own and the shuffled caption are equal."""
    tokenizer, model, processor, noiser, captions, clean = setup
    blind = get_transformer(tokenizer, "flow_prediction", seed=1)
    with torch.no_grad():
        embeddings = blind.get_input_embeddings().weight
        special = set(special_token_ids(tokenizer).values()) | {tokenizer.bos_token_id, tokenizer.eos_token_id}
        text_rows = [index for index in range(embeddings.shape[0]) if index not in special]
        embeddings[text_rows] = embeddings[text_rows[0]].clone()
    gap = text_conditioning_gap(blind, processor, noiser, captions, clean, num_bands=4, seed=0)
    assert gap.num_pairs == 32 and list(gap.own_loss) == ["t0-250", "t250-500", "t500-750", "t750-1000"]
    for value in gap.log_record().values():
        assert abs(value) < 1e-5


def test_a_model_that_follows_the_text_shows_the_gap_at_high_noise(setup):
    tokenizer, model, processor, noiser, captions, clean = setup
    before = text_conditioning_gap(model, processor, noiser, captions, clean, seed=0).relative_gap
    train_steps(model, processor, noiser, captions, clean, steps=60)
    assert model.training  # the measurement gives the mode back
    gap = text_conditioning_gap(model, processor, noiser, captions, clean, seed=0)
    after = gap.relative_gap
    # At high noise the caption is all that tells black from white: the wrong one costs several times the loss.
    assert after["t750-1000"] > 1.0 and after["t750-1000"] > 10 * abs(before["t750-1000"])
    assert gap.log_record()["text_gap/all"] > 0.5
    # Deterministic: the same draws give the same numbers.
    again = text_conditioning_gap(model, processor, noiser, captions, clean, seed=0)
    assert again.own_loss == gap.own_loss and again.shuffled_loss == gap.shuffled_loss


def test_partners_have_another_caption_and_bad_input_is_refused(setup):
    _, model, processor, noiser, _, clean = setup
    assert derangement_partner(["a", "a", "b"]) == [2, 2, 0]
    assert derangement_partner(["a", "a"]) == [0, 1]
    with pytest.raises(ValueError, match="Every caption is the same"):
        text_conditioning_gap(model, processor, noiser, ["a", "a"], clean[:2])
    with pytest.raises(ValueError, match=r"`captions` \(3\) and `clean_latents` \(2\)"):
        text_conditioning_gap(model, processor, noiser, ["a", "b", "c"], clean[:2])
