"""End to end (slow): a tiny model overfits four captioned images with the library's collator and noiser, then
`TransfusionPipeline` with the training script's inference scheduler gives each caption's own image back.

One run per prediction type (epsilon with min-SNR-gamma 5, v, flow) and patch encoder (linear, U-Net). Run with
`pytest -m slow tests/test_overfit_sampling.py`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup_lr_rate

from transfusion_hf import TransfusionConfig, TransfusionForMixedModal, training
from transfusion_hf.data.collator import TransfusionDataCollator
from transfusion_hf.noising import TransfusionNoiser
from transfusion_hf.pipeline_transfusion import TransfusionPipeline
from transfusion_hf.processing_transfusion import TransfusionProcessor, special_token_ids
from transfusion_hf.tokenization_transfusion import train_bpe_tokenizer
from transfusion_hf.training import CleanImageErrorTracker

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_transfusion.py"
IMAGE_SIZE = 8
PATCH_SIZE = 4
# Four colours; image k has them in its four quadrants rotated by k, so every image has the same mean colour and only
# the caption tells them apart.
COLOURS = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0], [1.0, 1.0, -1.0]])
CAPTIONS = ["red in the top left", "green in the top left", "blue in the top left", "yellow in the top left"]
BATCH_SIZE = 16  # each image 4 times
LEARNING_RATE = 5e-3
# Optimizer steps per (prediction type, patch encoder). v and flow get every image right after ~400 steps; epsilon
# learns the caption's layout at high noise far more slowly (its x0 error there is the noise error / sqrt(alpha_bar)),
# and with linear patch layers only passes after ~4000 steps (about 60 s on one core).
TRAIN_STEPS = {
    ("epsilon", "linear"): 4000,
    ("epsilon", "unet"): 1000,
    ("v_prediction", "linear"): 600,
    ("v_prediction", "unet"): 600,
    ("flow_prediction", "linear"): 600,
    ("flow_prediction", "unet"): 600,
}
# The training script's defaults.
NUM_INFERENCE_STEPS = 25
GUIDANCE_SCALE = 3.0


def quadrant_images() -> torch.Tensor:
    """`(4, 3, 8, 8)` pixels in [-1, 1]: image k's quadrants (TL, TR, BL, BR) hold colours k, k+1, k+2, k+3."""
    half = IMAGE_SIZE // 2
    images = torch.empty(len(COLOURS), 3, IMAGE_SIZE, IMAGE_SIZE)
    for k in range(len(COLOURS)):
        for quadrant, (row, column) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            colour = COLOURS[(k + quadrant) % len(COLOURS)]
            images[k, :, row * half : (row + 1) * half, column * half : (column + 1) * half] = colour[:, None, None]
    return images


def build_model(tokenizer, prediction_type: str, patch_encoder: str) -> TransfusionForMixedModal:
    hidden = 64
    config = TransfusionConfig(
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 64,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        latent_channels=3,
        latent_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        patch_encoder=patch_encoder,
        unet_block_out_channels=[16, 32, 32] if patch_encoder == "unet" else None,
        prediction_type=prediction_type,
        **special_token_ids(tokenizer),
        timestep_embedding_dim=32,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return TransfusionForMixedModal(config)


def train(model, collator, examples, steps: int, learning_rate: float) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = get_cosine_with_min_lr_schedule_with_warmup_lr_rate(optimizer, steps // 20, steps, min_lr_rate=0.05)
    model.train()
    losses = []
    for _ in range(steps):
        batch = collator(examples)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("patch_encoder", ["linear", "unet"])
@pytest.mark.parametrize(
    ("prediction_type", "snr_gamma"), [("epsilon", 5.0), ("v_prediction", None), ("flow_prediction", None)]
)
def test_overfit_then_sample_each_caption_gives_its_image(prediction_type, snr_gamma, patch_encoder):
    images = quadrant_images()
    tokenizer = train_bpe_tokenizer(CAPTIONS * 8, vocab_size=300)
    model = build_model(tokenizer, prediction_type, patch_encoder)
    train_scheduler = training.training_scheduler(prediction_type)
    noiser = TransfusionNoiser(train_scheduler, prediction_type, snr_gamma=snr_gamma)
    processor = TransfusionProcessor(tokenizer, image_size=IMAGE_SIZE, num_image_tokens=model.config.num_patches)
    collator = TransfusionDataCollator(processor, noiser, seed=0)
    examples = [
        {"text": CAPTIONS[index % len(CAPTIONS)], "latents": images[index % len(CAPTIONS)]}
        for index in range(BATCH_SIZE)
    ]
    losses = train(model, collator, examples, TRAIN_STEPS[prediction_type, patch_encoder], LEARNING_RATE)
    assert sum(losses[-20:]) < sum(losses[:20])
    # Diagnostics for the failure message: the implied x0's error against the mean image's, per noise level.
    tracker = CleanImageErrorTracker(noiser)
    model.eval()
    with torch.no_grad():
        for _ in range(8):
            batch = collator(examples)
            tracker.update(batch, model(**batch).diffusion_predictions)
    x0_error_ratios = {name.split("/")[1]: round(value, 4) for name, value in tracker.compute().items()}

    scheduler = training.inference_scheduler(argparse.Namespace(inference_scheduler=None), train_scheduler)
    expected_scheduler = "FlowMatchEulerDiscreteScheduler" if prediction_type == "flow_prediction" else "DPMSolver"
    assert type(scheduler).__name__.startswith(expected_scheduler)
    pipe = TransfusionPipeline(transformer=model, scheduler=scheduler, vae=None, tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    samples = pipe(
        CAPTIONS,
        num_inference_steps=NUM_INFERENCE_STEPS,
        guidance_scale=GUIDANCE_SCALE,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    targets = (images + 1) / 2  # the pipeline's [0, 1] pixels
    errors = (samples[:, None] - targets[None]).pow(2).flatten(2).mean(2)  # (sample, training image)
    own = errors.diagonal()
    others = errors.masked_fill(torch.eye(len(CAPTIONS), dtype=torch.bool), float("inf")).amin(1)
    report = (
        f"{prediction_type}/{patch_encoder}: MSE to own image {own.tolist()}, to the nearest other {others.tolist()}; "
        f"x0 error ratios {x0_error_ratios}"
    )
    # The right image: at most half the RMS distance to its own image as to any other one. A mean-image sample (all
    # distances equal) or one wrong quadrant (MSE ~0.17 against ~0.4) fails.
    assert (own < 0.25 * others).all(), report
