"""TransfusionNoiser: timesteps, noisy latents and targets with diffusers schedulers."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from transfusion_hf.noising import TransfusionNoiser

SHAPE = (6, 4, 4, 4)


def clean_latents(seed=0, scale=1.0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)) * scale


def noise_of(seed):
    """The noise `add_noise` draws from a generator seeded with `seed` (its first and only draw)."""
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def ddpm(**kwargs):
    return DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False, **kwargs)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_noisy_latents_and_targets(prediction_type):
    scheduler = ddpm()
    noiser = TransfusionNoiser(scheduler, prediction_type)
    x0, timesteps = clean_latents(), torch.tensor([0, 1, 250, 500, 998, 999])
    out = noiser.add_noise(x0, timesteps, torch.Generator().manual_seed(7))
    noise = noise_of(7)
    assert torch.equal(out.timesteps, timesteps)
    torch.testing.assert_close(out.latents, scheduler.add_noise(x0, noise, timesteps))
    expected = noise if prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, timesteps)
    torch.testing.assert_close(out.targets, expected)
    if prediction_type == "v_prediction":
        # v = sqrt(a) eps - sqrt(1 - a) x0.
        alphas = scheduler.alphas_cumprod[timesteps][:, None, None, None]
        torch.testing.assert_close(out.targets, alphas.sqrt() * noise - (1 - alphas).sqrt() * x0)


def test_flow_matching_latents_and_targets():
    scheduler = FlowMatchEulerDiscreteScheduler()
    noiser = TransfusionNoiser(scheduler, "flow_prediction")
    x0 = clean_latents()
    timesteps = torch.tensor([1.0, 100.0, 250.0, 500.0, 900.0, 1000.0])
    out = noiser.add_noise(x0, timesteps, torch.Generator().manual_seed(3))
    noise, sigmas = noise_of(3), (timesteps / 1000)[:, None, None, None]
    torch.testing.assert_close(out.latents, (1 - sigmas) * x0 + sigmas * noise)
    torch.testing.assert_close(out.targets, noise - x0)
    # The same x_t as diffusers' own forward process at those (training-schedule) timesteps.
    for row, timestep in enumerate(timesteps):
        expected = scheduler.scale_noise(x0[row : row + 1], timestep.reshape(1), noise[row : row + 1])
        torch.testing.assert_close(out.latents[row : row + 1], expected)


@pytest.mark.parametrize("prediction_type", ["epsilon", "flow_prediction"])
def test_timesteps_and_image_first_limit(prediction_type):
    scheduler = FlowMatchEulerDiscreteScheduler() if prediction_type == "flow_prediction" else ddpm()
    noiser = TransfusionNoiser(scheduler, prediction_type)
    count = 4000
    image_first = torch.arange(count) % 2 == 0
    out = noiser(torch.zeros(count, 1, 1, 1), image_first, torch.Generator().manual_seed(0))
    first, second = out.timesteps[image_first], out.timesteps[~image_first]
    assert first.min() >= 0 and first.max() <= 500 and first.max() > 480
    assert second.min() >= 0 and second.max() > 950
    if prediction_type == "flow_prediction":
        assert out.timesteps.is_floating_point() and second.max() <= 1000
    else:
        assert out.timesteps.dtype == torch.long and second.max() <= 999
        assert first.max() == 500  # inclusive limit for DDPM
    # Uniform: the mean of the uncapped half is near T / 2.
    assert abs(second.float().mean().item() - 500) < 25


def test_layout_probabilities():
    noiser = TransfusionNoiser(ddpm(), image_first_probability=0.2, caption_dropout_probability=0.1)
    image_first, dropped = noiser.sample_layout(20000, torch.Generator().manual_seed(0))
    assert abs(image_first.float().mean().item() - 0.2) < 0.015
    assert not (image_first & dropped).any()
    assert abs(dropped[~image_first].float().mean().item() - 0.1) < 0.015
    always = TransfusionNoiser(ddpm(), image_first_probability=1.0, caption_dropout_probability=1.0)
    image_first, dropped = always.sample_layout(50, torch.Generator().manual_seed(0))
    assert image_first.all() and not dropped.any()
    never = TransfusionNoiser(ddpm(), image_first_probability=0.0, caption_dropout_probability=1.0)
    image_first, dropped = never.sample_layout(50, torch.Generator().manual_seed(0))
    assert not image_first.any() and dropped.all()


def test_deterministic_for_a_seeded_generator():
    noiser = TransfusionNoiser(ddpm())
    x0, image_first = clean_latents(), torch.tensor([True, False] * 3)
    a = noiser(x0, image_first, torch.Generator().manual_seed(11))
    b = noiser(x0, image_first, torch.Generator().manual_seed(11))
    assert torch.equal(a.latents, b.latents) and torch.equal(a.timesteps, b.timesteps)
    c = noiser(x0, image_first, torch.Generator().manual_seed(12))
    assert not torch.equal(a.latents, c.latents)


@pytest.mark.parametrize(
    ("scheduler", "prediction_type"),
    [
        (ddpm(), "flow_prediction"),
        (DDIMScheduler(), "flow_prediction"),
        (FlowMatchEulerDiscreteScheduler(), "epsilon"),
        (FlowMatchEulerDiscreteScheduler(), "v_prediction"),
    ],
)
def test_scheduler_prediction_type_mismatch_raises(scheduler, prediction_type):
    with pytest.raises(ValueError, match="does not fit the scheduler"):
        TransfusionNoiser(scheduler, prediction_type)


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="prediction_type"):
        TransfusionNoiser(ddpm(), "sample")
    for name in ("image_first_probability", "caption_dropout_probability"):
        for value in (-0.1, 1.5):
            with pytest.raises(ValueError, match=name):
                TransfusionNoiser(ddpm(), **{name: value})
    for value in (0, 1001):
        with pytest.raises(ValueError, match="image_first_max_timestep"):
            TransfusionNoiser(ddpm(), image_first_max_timestep=value)


def _sample_with_perfect_model(scheduler, x0, prediction_type, steps=10):
    """Run the scheduler with a model that knows x0 and returns the exact target for the current x_t."""
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(x0.shape, generator=generator) * getattr(scheduler, "init_noise_sigma", 1.0)
    for timestep in scheduler.timesteps:
        if prediction_type == "flow_prediction":
            sigma = timestep / scheduler.config.num_train_timesteps
            noise = (sample - (1 - sigma) * x0) / sigma
            prediction = noise - x0
        else:
            alpha = scheduler.alphas_cumprod[int(timestep)]
            noise = (sample - alpha.sqrt() * x0) / (1 - alpha).sqrt()
            prediction = noise if prediction_type == "epsilon" else alpha.sqrt() * noise - (1 - alpha).sqrt() * x0
        sample = scheduler.step(prediction, timestep, sample, generator=generator).prev_sample
    return sample


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow_prediction"])
def test_perfect_predictor_recovers_x0(prediction_type):
    # Latents are not confined to [-1, 1]: scale them up so clipping would show.
    x0 = clean_latents(scale=3.0)
    if prediction_type == "flow_prediction":
        scheduler = FlowMatchEulerDiscreteScheduler()
    else:
        scheduler = ddpm(prediction_type=prediction_type)
    # The targets the noiser trains on are exactly what the sampler consumes.
    noiser = TransfusionNoiser(scheduler, prediction_type)
    recovered = _sample_with_perfect_model(scheduler, x0, prediction_type)
    assert (recovered - x0).abs().max() < 1e-3
    if prediction_type == "epsilon":
        # Sanity of the check itself: the DDPM default clip_sample=True ruins latents.
        clipped = _sample_with_perfect_model(DDPMScheduler(beta_schedule="squaredcos_cap_v2"), x0, prediction_type)
        assert (clipped - x0).abs().max() > 1.0
        # And the noiser's own target at some t is what the perfect model returns there.
        out = noiser.add_noise(x0, torch.full((SHAPE[0],), 600), torch.Generator().manual_seed(2))
        alpha = scheduler.alphas_cumprod[600]
        torch.testing.assert_close(
            out.targets, (out.latents - alpha.sqrt() * x0) / (1 - alpha).sqrt(), atol=1e-4, rtol=0
        )


def test_noise_offset_shifts_each_image_and_channel_by_one_constant():
    """Offset noise: the noise of each (image, channel) moves by one constant of the asked scale; without it the draws
    are the former ones; flow refuses it."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    clean = torch.zeros(64, 3, 8, 8)
    timesteps = torch.full((64,), 999)
    plain = TransfusionNoiser(DDPMScheduler(), "epsilon").add_noise(clean, timesteps, torch.Generator().manual_seed(0))
    again = TransfusionNoiser(DDPMScheduler(), "epsilon", noise_offset=0.0)
    torch.testing.assert_close(
        again.add_noise(clean, timesteps, torch.Generator().manual_seed(0)).targets, plain.targets
    )
    offset = TransfusionNoiser(DDPMScheduler(), "epsilon", noise_offset=0.5)
    shifted = offset.add_noise(clean, timesteps, torch.Generator().manual_seed(0)).targets
    difference = shifted - plain.targets  # the same first draw, plus the offset
    per_channel = difference.flatten(2)
    torch.testing.assert_close(per_channel, per_channel[..., :1].expand_as(per_channel))  # constant in space
    assert 0.35 < float(per_channel[..., 0].std()) < 0.65  # of scale 0.5
    with pytest.raises(ValueError, match=r"`noise_offset`=0.1 is for 'epsilon' and 'v_prediction'"):
        TransfusionNoiser(FlowMatchEulerDiscreteScheduler(), "flow_prediction", noise_offset=0.1)
    with pytest.raises(ValueError, match=r"`noise_offset` must be a number >= 0, got -1"):
        TransfusionNoiser(DDPMScheduler(), "epsilon", noise_offset=-1)
