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
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_snr

from .configuration_transfusion import PREDICTION_TYPES

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "importance")
SNR_WEIGHTINGS = ("min_snr", "truncated_min_snr")
# Below this SNR (t > ~935 of the cosine schedule) an epsilon prediction says next to nothing about the image: the
# implied x0 divides by sqrt(alpha_bar) < 0.1. "truncated_min_snr" caps the epsilon weights there instead of letting
# them grow to 1 / SNR ~ 4e8 at t = 999.
MIN_SNR_OF_WEIGHTS = 0.01


@dataclass
class NoisedImages:
    """What the model needs for its diffusion loss.

    Args:
        latents (`torch.Tensor` of shape `(num_images, C, H, W)`): noisy latents x_t.
        timesteps (`torch.Tensor` of shape `(num_images,)`): the time of each image in `[0, num_train_timesteps]`.
        targets (`torch.Tensor` of shape `(num_images, C, H, W)`): in the units of the prediction type.
        loss_weights (`torch.Tensor` of shape `(num_images,)`, *optional*): per-image weights of the diffusion MSE
            (min-SNR-gamma), None for plain MSE.
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    targets: torch.Tensor
    loss_weights: torch.Tensor | None = None


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
        snr_gamma (`float`, *optional*): min-SNR-gamma loss weighting (Hang et al., 2023) for `"epsilon"` and
            `"v_prediction"`, with diffusers' `compute_snr`: the per-image MSE is weighted so that it equals
            `min(SNR, gamma)` times the error on the clean image. Without it an epsilon loss weights the clean-image
            error by SNR itself, which is thousands at low noise and almost nothing at high noise.
        snr_weighting (`str`, defaults to `"min_snr"`): with `snr_gamma`, `"min_snr"` weights the clean-image error by
            `min(SNR, gamma)` (Hang et al.), which still gives it almost no weight at high noise, where layout is
            decided; `"truncated_min_snr"` by `clip(SNR, 1, gamma)` (the truncated SNR weighting of Salimans and Ho,
            2022, capped like min-SNR), so high-noise steps learn the image as v-prediction and flow matching do.
        normalize_snr_weights (`bool`, defaults to `False`): with `snr_gamma`, divide the weights by their mean over
            the training timesteps, so the weighted diffusion loss keeps the scale of the plain one and the paper's
            `lambda` (`diffusion_loss_weight`) keeps its balance against the LM loss. The truncated weights average
            ~12 on the cosine schedule (up to 100 at high noise), so unnormalised they multiply lambda by ~12.
        timestep_sampling (`str`, defaults to `"uniform"`): `"uniform"`; `"logit_normal"` (SD3: flow-matching times
            drawn as `sigmoid(N(logit_mean, logit_std))`, more of them in the middle; `"flow_prediction"` only); or
            `"importance"` (with `snr_gamma`: DDPM timesteps drawn in proportion to `w(t) ** importance_exponent`,
            `w` the SNR weight, and each image reweighted so that the expected loss is that of uniform times
            weighted by `w(t)`, with less variance: the truncated weights span 2e-4 to 100 and leave uniform times
            an effective batch of ~17% of the images).
        importance_exponent (`float`, *optional*): of `"importance"`, in (0, 1], 0.5 when not given. 1 draws t in
            proportion to its weight and gives every image of a range the same weight (effective batch 100%), but puts
            54% of the truncated epsilon draws at t > 935, where the sampler barely goes; 0.5 keeps a third of them
            below t = 750 (effective batch 68%) and drew better in the paper's recipe (README).
        logit_mean (`float`, defaults to 0.0), logit_std (`float`, defaults to 1.0): of `"logit_normal"`.
        noise_offset (`float`, defaults to 0): offset noise for epsilon / v prediction: `noise_offset` times a
            per-image, per-channel normal constant is added to the noise (diffusers' `--noise_offset`).
    """

    def __init__(
        self,
        scheduler,
        prediction_type: str = "epsilon",
        image_first_probability: float = 0.2,
        image_first_max_timestep: int = 500,
        caption_dropout_probability: float = 0.1,
        snr_gamma: float | None = None,
        snr_weighting: str = "min_snr",
        normalize_snr_weights: bool = False,
        timestep_sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        importance_exponent: float | None = None,
        noise_offset: float = 0.0,
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
        if snr_gamma is not None and (not isinstance(snr_gamma, (int, float)) or snr_gamma <= 0):
            raise ValueError(f"`snr_gamma` must be a positive number, got {snr_gamma!r}.")
        if snr_gamma is not None and is_flow:
            raise ValueError(
                f"`snr_gamma`={snr_gamma} applies to 'epsilon' and 'v_prediction' (DDPM-type schedulers), not to "
                "'flow_prediction'."
            )
        if snr_weighting not in SNR_WEIGHTINGS:
            raise ValueError(f"`snr_weighting` must be one of {SNR_WEIGHTINGS}, got {snr_weighting!r}.")
        if snr_weighting != "min_snr" and snr_gamma is None:
            raise ValueError(f"`snr_weighting`={snr_weighting!r} needs `snr_gamma` (the cap of the weights).")
        if normalize_snr_weights and snr_gamma is None:
            raise ValueError("`normalize_snr_weights`=True needs `snr_gamma` (there are no weights to normalise).")
        if timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"`timestep_sampling` must be one of {TIMESTEP_SAMPLINGS}, got {timestep_sampling!r}.")
        if timestep_sampling == "logit_normal" and not is_flow:
            raise ValueError(
                f"`timestep_sampling`='logit_normal' draws flow-matching times; got `prediction_type`={prediction_type!r}."
            )
        if timestep_sampling == "importance" and snr_gamma is None:
            raise ValueError(
                "`timestep_sampling`='importance' draws timesteps in proportion to the SNR loss weights; it needs "
                f"`snr_gamma` (got None, `prediction_type`={prediction_type!r})."
            )
        if logit_std <= 0:
            raise ValueError(f"`logit_std` must be positive, got {logit_std!r}.")
        if not isinstance(noise_offset, (int, float)) or noise_offset < 0:
            raise ValueError(f"`noise_offset` must be a number >= 0, got {noise_offset!r}.")
        if noise_offset and is_flow:
            raise ValueError(
                f"`noise_offset`={noise_offset} is for 'epsilon' and 'v_prediction' (a DDPM-type schedule whose last "
                "step keeps part of the image's mean), not for 'flow_prediction'."
            )
        self.noise_offset = float(noise_offset)
        if importance_exponent is not None and not 0 < importance_exponent <= 1:
            raise ValueError(f"`importance_exponent` must be in (0, 1], got {importance_exponent!r}.")
        if importance_exponent is not None and timestep_sampling != "importance":
            raise ValueError(
                f"`importance_exponent`={importance_exponent!r} has no effect with `timestep_sampling`="
                f"{timestep_sampling!r}: it shapes the 'importance' draws only."
            )
        self.snr_gamma = snr_gamma
        self.snr_weighting = snr_weighting
        self.timestep_sampling = timestep_sampling
        self.logit_mean = logit_mean
        self.logit_std = logit_std
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
        self.snr_weight_scale = 1.0
        if normalize_snr_weights:
            # Uniform timesteps: the mean weight over the whole schedule is the expected weight of a drawn image.
            self.snr_weight_scale = 1.0 / float(self.loss_weights(torch.arange(self.num_train_timesteps)).mean())
        # "importance": p(t) = w(t)^a / sum_{s <= limit} w(s)^a over 0..limit; the cumulative sums of w^a give the
        # inverse CDF. An image drawn at t then weighs w(t) / ((limit + 1) p(t)) = w(t)^(1 - a) * cumsum[limit] /
        # (limit + 1), so E_p[weight * loss(t)] = mean over 0..limit of w(t) loss(t), as with uniform times. Written
        # here: diffusers' `compute_density_for_timestep_sampling` draws from fixed densities (uniform, logit-normal,
        # mode) without reweighting, so it would change the objective instead of its variance.
        self.importance_exponent = 0.5 if importance_exponent is None else float(importance_exponent)
        self.cumulative_weights = None
        if timestep_sampling == "importance":
            every_weight = self.loss_weights(torch.arange(self.num_train_timesteps)).double()
            self.cumulative_weights = torch.cumsum(every_weight**self.importance_exponent, dim=0)

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
        """Timesteps (uniform, logit-normal or in proportion to their weight), one per image, each below its own limit.

        Args:
            max_timesteps (`torch.Tensor` of shape `(num_images,)`): upper bound of each image, inclusive for DDPM.

        Returns:
            `torch.Tensor` of shape `(num_images,)`: integers for DDPM-style schedulers, `sigma * T` floats for flow
            matching.
        """
        if self.cumulative_weights is not None:
            # Inverse CDF of p(t) over 0..limit, one limit per image (see __init__).
            totals = self.cumulative_weights[max_timesteps.long()]
            targets = torch.rand(max_timesteps.shape[0], generator=generator, dtype=torch.float64) * totals
            timesteps = torch.searchsorted(self.cumulative_weights, targets, right=True)
            return torch.minimum(timesteps, max_timesteps.long())
        uniform = compute_density_for_timestep_sampling(
            self.timestep_sampling,
            max_timesteps.shape[0],
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            generator=generator,
        )
        if self.prediction_type == "flow_prediction":
            return uniform * max_timesteps.float()
        return torch.minimum((uniform * (max_timesteps.float() + 1)).long(), max_timesteps.long())

    def add_noise(
        self, clean_latents: torch.Tensor, timesteps: torch.Tensor, generator: torch.Generator
    ) -> NoisedImages:
        """Noise clean latents at the given timesteps and compute the targets.

        Args:
            clean_latents (`torch.Tensor` of shape `(num_images, C, H, W)`): the clean latents.
            timesteps (`torch.Tensor` of shape `(num_images,)`): their timesteps.
        """
        noise = torch.randn(clean_latents.shape, generator=generator, dtype=torch.float32).to(clean_latents)
        if self.noise_offset:
            # Offset noise (diffusers' training examples, `--noise_offset`): a per-image, per-channel constant added
            # to the noise, so the model learns to move an image's mean colour, which plain noise hardly changes and
            # an epsilon model then gets wrong from pure noise (tinted backgrounds). Drawn only when asked, so runs
            # without it keep their draws.
            shift = torch.randn((*clean_latents.shape[:2], 1, 1), generator=generator, dtype=torch.float32)
            noise = noise + self.noise_offset * shift.to(clean_latents)
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
        return NoisedImages(noisy, timesteps, target, self.loss_weights(timesteps))

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Min-SNR-gamma weights of each image's MSE (diffusers' recipe), or None without `snr_gamma`.

        Args:
            timesteps (`torch.Tensor` of shape `(num_images,)`): integer DDPM timesteps.
        """
        if self.snr_gamma is None:
            return None
        snr = compute_snr(self.scheduler, timesteps.long())
        if self.snr_weighting == "min_snr":
            clean_weight = torch.clamp(snr, max=self.snr_gamma)
        else:
            clean_weight = torch.clamp(snr, min=1.0, max=max(self.snr_gamma, 1.0))
            snr = torch.clamp(snr, min=MIN_SNR_OF_WEIGHTS)
        # epsilon MSE = SNR * x0 MSE and v MSE = (SNR + 1) * x0 MSE: dividing leaves clean_weight * x0 MSE.
        weights = clean_weight / snr if self.prediction_type == "epsilon" else clean_weight / (snr + 1)
        return weights * self.snr_weight_scale

    def predict_clean(self, noisy_latents: torch.Tensor, predictions: torch.Tensor, timesteps: torch.Tensor):
        """The clean latents x0 implied by a prediction (or a target) in the units of the prediction type.

        Args:
            noisy_latents (`torch.Tensor` of shape `(num_images, C, H, W)`): x_t.
            predictions (`torch.Tensor` of shape `(num_images, C, H, W)`): noise, velocity or flow.
            timesteps (`torch.Tensor` of shape `(num_images,)`): their timesteps.

        Returns:
            `torch.Tensor` of shape `(num_images, C, H, W)` in float32.
        """
        noisy, predictions = noisy_latents.float(), predictions.float()
        if self.prediction_type == "flow_prediction":
            sigmas = (timesteps.float() / self.num_train_timesteps).to(noisy.device)[:, None, None, None]
            return noisy - sigmas * predictions
        alphas_cumprod = self.scheduler.alphas_cumprod.to(noisy.device)[timesteps.long()][:, None, None, None]
        alpha, sigma = alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()
        if self.prediction_type == "v_prediction":
            return alpha * noisy - sigma * predictions
        return (noisy - sigma * predictions) / alpha

    def __call__(
        self, clean_latents: torch.Tensor, image_first: torch.Tensor, generator: torch.Generator
    ) -> NoisedImages:
        """Timesteps (capped for image-first pairs) and noise for one image per pair.

        Args:
            clean_latents (`torch.Tensor` of shape `(num_images, C, H, W)`): the clean latents.
            image_first (`torch.BoolTensor` of shape `(num_images,)`): pairs under the noise limit.
        """
        top = self.num_train_timesteps if self.prediction_type == "flow_prediction" else self.num_train_timesteps - 1
        limits = torch.where(image_first, torch.tensor(self.image_first_max_timestep), torch.tensor(top)).to(
            torch.long
        )
        timesteps = self.sample_timesteps(limits, generator)
        noised = self.add_noise(clean_latents, timesteps, generator)
        if self.cumulative_weights is not None:
            # The same expected loss as uniform times weighted by w(t) (see __init__); add_noise gave each image w(t).
            drawn_weight = noised.loss_weights.double() ** (1 - self.importance_exponent)
            noised.loss_weights = (drawn_weight * self.cumulative_weights[limits] / (limits + 1).double()).float()
        return noised


__all__ = ["NoisedImages", "TransfusionNoiser"]
