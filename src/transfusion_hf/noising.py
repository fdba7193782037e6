"""Training-time noising with a diffusers scheduler: timesteps, noisy latents, targets, and the pair layout.

Used by the collator and the training script, so nobody re-implements the noise schedule (paper, section 3.3 and
4.1): per-image timesteps, caption-first vs image-first pairs (80/20), the noise limit for image-first pairs
(t <= 500 of 1000), and caption dropout for classifier-free guidance. Every random draw comes from one
`torch.Generator`, so a run resumed from a checkpoint draws exactly the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from .configuration_transfusion import PREDICTION_TYPES


@dataclass
class NoisedImages:
    """What the model needs for its diffusion loss.

    Args:
        latents (`torch.Tensor` of shape `(num_images, C, H, W)`): noisy latents x_t.
        timesteps (`torch.Tensor` of shape `(num_images,)`): the time of each image in `[0, num_train_timesteps]`.
        targets (`torch.Tensor` of shape `(num_images, C, H, W)`): in the units of the prediction type.
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    targets: torch.Tensor


class TransfusionNoiser:
    """Draws timesteps and noise for a batch of clean latents with a diffusers scheduler.

    Args:
        scheduler: a diffusers training scheduler. `DDPMScheduler` (the paper: 1000 steps, `squaredcos_cap_v2`) for
            `"epsilon"` and `"v_prediction"`; `FlowMatchEulerDiscreteScheduler` for `"flow_prediction"`.
        prediction_type (`str`): `"epsilon"`, `"v_prediction"` or `"flow_prediction"`.
        image_first_probability (`float`, defaults to 0.2): share of pairs laid out image -> caption.
        image_first_max_timestep (`int`, defaults to 500): noise limit for image-first pairs, of 1000.
        caption_dropout_probability (`float`, defaults to 0.1): share of caption-first pairs whose caption is dropped,
            so the model also learns the unconditional distribution that classifier-free guidance needs.
    """

    def __init__(
        self,
        scheduler,
        prediction_type: str = "epsilon",
        image_first_probability: float = 0.2,
        image_first_max_timestep: int = 500,
        caption_dropout_probability: float = 0.1,
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {prediction_type!r}.")
        is_flow = isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
        if is_flow != (prediction_type == "flow_prediction"):
            raise ValueError(
                f"`prediction_type`={prediction_type!r} does not fit the scheduler {type(scheduler).__name__}: "
                "use FlowMatchEulerDiscreteScheduler for 'flow_prediction' and DDPMScheduler otherwise."
            )
        for name, value in (
            ("image_first_probability", image_first_probability),
            ("caption_dropout_probability", caption_dropout_probability),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"`{name}` must be in [0, 1], got {value!r}.")
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        if not 0 < image_first_max_timestep <= self.num_train_timesteps:
            raise ValueError(
                f"`image_first_max_timestep` must be in (0, {self.num_train_timesteps}], got {image_first_max_timestep!r}."
            )
        self.scheduler = scheduler
        self.prediction_type = prediction_type
        self.image_first_probability = image_first_probability
        self.image_first_max_timestep = image_first_max_timestep
        self.caption_dropout_probability = caption_dropout_probability

    def sample_layout(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw the order and the caption dropout of each pair.

        Returns:
            `image_first` and `drop_caption`, two `torch.BoolTensor` of shape `(batch_size,)`. A dropped caption only
            happens in caption-first pairs (an image-first pair without caption teaches nothing about captions).
        """
        image_first = torch.rand(batch_size, generator=generator) < self.image_first_probability
        drop_caption = torch.rand(batch_size, generator=generator) < self.caption_dropout_probability
        return image_first, drop_caption & ~image_first

    def sample_timesteps(self, max_timesteps: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Uniform timesteps, one per image, each below its own limit.

        Args:
            max_timesteps (`torch.Tensor` of shape `(num_images,)`): upper bound of each image, inclusive for DDPM.

        Returns:
            `torch.Tensor` of shape `(num_images,)`: integers for DDPM-style schedulers, `sigma * T` floats for flow
            matching.
        """
        uniform = torch.rand(max_timesteps.shape[0], generator=generator)
        if self.prediction_type == "flow_prediction":
            return uniform * max_timesteps.float()
        return torch.minimum((uniform * (max_timesteps.float() + 1)).long(), max_timesteps.long())

    def add_noise(
        self, clean_latents: torch.Tensor, timesteps: torch.Tensor, generator: torch.Generator
    ) -> NoisedImages:
        """Noise clean latents at the given timesteps and compute the targets.

        Args:
            clean_latents (`torch.Tensor` of shape `(num_images, C, H, W)`).
            timesteps (`torch.Tensor` of shape `(num_images,)`).
        """
        noise = torch.randn(clean_latents.shape, generator=generator, dtype=torch.float32).to(clean_latents)
        if self.prediction_type == "flow_prediction":
            # Rectified flow: x_t = (1 - sigma) x0 + sigma noise, velocity target noise - x0 (SD3, diffusers'
            # FlowMatchEulerDiscreteScheduler.scale_noise).
            sigmas = (timesteps.float() / self.num_train_timesteps).to(clean_latents)[:, None, None, None]
            noisy = (1.0 - sigmas) * clean_latents + sigmas * noise
            return NoisedImages(noisy, timesteps, noise - clean_latents)
        noisy = self.scheduler.add_noise(clean_latents, noise, timesteps)
        if self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(clean_latents, noise, timesteps)
        else:
            target = noise
        return NoisedImages(noisy, timesteps, target)

    def __call__(
        self, clean_latents: torch.Tensor, image_first: torch.Tensor, generator: torch.Generator
    ) -> NoisedImages:
        """Timesteps (capped for image-first pairs) and noise for one image per pair.

        Args:
            clean_latents (`torch.Tensor` of shape `(num_images, C, H, W)`).
            image_first (`torch.BoolTensor` of shape `(num_images,)`): pairs under the noise limit.
        """
        top = self.num_train_timesteps if self.prediction_type == "flow_prediction" else self.num_train_timesteps - 1
        limits = torch.where(image_first, torch.tensor(self.image_first_max_timestep), torch.tensor(top)).to(
            torch.long
        )
        timesteps = self.sample_timesteps(limits, generator)
        return self.add_noise(clean_latents, timesteps, generator)


__all__ = ["NoisedImages", "TransfusionNoiser"]
