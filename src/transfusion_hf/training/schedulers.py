"""The noise schedules of a run: the training scheduler and noiser of the objective, and the sampling scheduler saved
with the pipeline.
"""

from __future__ import annotations

import argparse

from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..configuration_transfusion import PREDICTION_TYPES
from ..noising import TransfusionNoiser
from ..pipeline_transfusion import TransfusionPipeline

# Short names of `--inference_scheduler`; which schedulers fit which prediction type is the pipeline's knowledge
# (`TransfusionPipeline._compatibles`), and any scheduler class it lists is a choice too.
SCHEDULER_ALIASES = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "flow_euler": "FlowMatchEulerDiscreteScheduler",
}


INFERENCE_SCHEDULER_CHOICES = sorted(SCHEDULER_ALIASES) + sorted(
    {scheduler.__name__ for kind in PREDICTION_TYPES for scheduler in TransfusionPipeline.compatible_schedulers(kind)}
)


def training_scheduler(prediction_type: str) -> DDPMScheduler | FlowMatchEulerDiscreteScheduler:
    """The paper's DDPM (1000 steps, cosine schedule) or rectified flow."""
    if prediction_type == "flow_prediction":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=prediction_type,
        clip_sample=False,
    )


def build_noiser(args: argparse.Namespace, prediction_type: str) -> TransfusionNoiser:
    """The training-time noising of the run (raises a ValueError naming the flag for a bad combination)."""
    return TransfusionNoiser(
        training_scheduler(prediction_type),
        prediction_type,
        args.image_first_probability,
        args.image_first_max_timestep,
        args.caption_dropout_probability,
        snr_gamma=args.snr_gamma,
        snr_weighting=args.snr_weighting,
        normalize_snr_weights=args.normalize_snr_weights == "true",
        timestep_sampling=args.timestep_sampling,
        logit_mean=args.logit_mean,
        logit_std=args.logit_std,
        importance_exponent=args.importance_exponent,
        noise_offset=args.noise_offset,
    )


def inference_scheduler(args: argparse.Namespace, train_scheduler: SchedulerMixin) -> SchedulerMixin:
    """The sampling scheduler of `--inference_scheduler`, built from the training scheduler's config by the pipeline
    (raises a ValueError naming the flag when it does not fit the prediction type)."""
    prediction_type = TransfusionPipeline.scheduler_prediction_type(train_scheduler)
    pixel_space = getattr(args, "vae_name_or_path", None) is None
    # Pixel space samples with DPM-Solver++ SDE (below) whatever the objective; on a VAE's latents flow keeps
    # FlowMatchEuler.
    default = "flow_euler" if prediction_type == "flow_prediction" and not pixel_space else "dpm"
    name = SCHEDULER_ALIASES.get(args.inference_scheduler or default, args.inference_scheduler or default)
    overrides = {}
    if prediction_type == "epsilon":
        overrides = TransfusionPipeline.epsilon_start_below_zero_snr(name)
    if pixel_space and args.inference_scheduler is None:
        # Pixel space samples stochastically: fresh noise at every step washes out the model's errors instead of
        # integrating them. DPM-Solver++ SDE, a discretisation of the reverse SDE, samples the model's distribution;
        # FlowMatchEuler's `stochastic_sampling` (the former flow default) re-noises the predicted clean image, a
        # posterior mean, at every step, so its samples drift towards the prompt's average image: on the photo folder
        # (docs/research/recipes.md) the samples of one prompt spread 0.63x as much as real crops (0.94x with the SDE)
        # and t2i 0.82 (0.91); on the shapes 1.00 (0.98). For epsilon / v the SDE also clamps the implied clean image
        # to [-1, 1] (the paper's recipe after 10 CPU minutes: 0.18 -> 0.42); for flow the clamp cost the shapes 0.03.
        overrides["algorithm_type"] = "sde-dpmsolver++"
        if prediction_type != "flow_prediction":
            overrides.update(TransfusionPipeline.pixel_range_clamp(name))
    elif pixel_space:
        # A chosen scheduler in pixel space clamps the implied clean image to [-1, 1] where its class can (DDPM's own
        # sampler does).
        overrides.update(TransfusionPipeline.pixel_range_clamp(name))
    try:
        return TransfusionPipeline.scheduler_from_config(name, train_scheduler.config, prediction_type, **overrides)
    except ValueError as error:
        raise ValueError(f"--inference_scheduler={args.inference_scheduler or name}: {error}") from error
