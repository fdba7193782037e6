"""Which diffusers schedulers sample a Transfusion model right, and how one is built for it.

A mixin of [`TransfusionPipeline`], as diffusers' pipelines take helpers from mixins: its classmethods are the
pipeline's (`TransfusionPipeline.scheduler_from_config(...)`), which the training code uses to pick the sampler it
saves with a pipeline. Nothing here runs a model.
"""

from __future__ import annotations

import inspect
from typing import Any

import diffusers
from diffusers import AutoencoderKL
from diffusers.configuration_utils import FrozenDict
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import logging
from transformers import PreTrainedModel

logger = logging.get_logger(__name__)


# Half the log-SNR where an epsilon sampler's schedule is cut (diffusers' `lambda_min_clipped`, "critical for the
# cosine schedule" in its docs; unCLIP uses the same value): t = 995 of DDPM's 1000-step cosine schedule.
EPSILON_LAMBDA_MIN = -5.1
# Samplers of a DDPM-style noise schedule (betas): the same for epsilon and v models.
_NOISE_SCHEDULE_SCHEDULERS = [
    "DDPMScheduler",
    "DDIMScheduler",
    "DEISMultistepScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "UniPCMultistepScheduler",
]


class TransfusionSchedulerMixin:
    """The scheduler knowledge of [`TransfusionPipeline`]: the compatible diffusers schedulers per prediction type
    (`_compatibles`), building one from another's config (`scheduler_from_config`), the config fields of sampling in
    pixel space (`pixel_range_clamp`) and of an epsilon model on the cosine schedule (`epsilon_start_below_zero_snr`),
    and the checks every scheduler the pipeline samples with goes through (`_checked_scheduler`).
    """

    # diffusers scheduler classes that sample right with a model of each prediction type, built from the pipeline's
    # scheduler config by `scheduler_from_config` (each is checked with an exact predictor in
    # tests/test_pipeline_transfusion.py). Left out: KDPM2Ancestral (NaN at 10 steps on the cosine schedule), PNDM
    # (v prediction off by 0.2 at 10 steps), SA-Solver and DEIS on flow (off by 0.3 to 0.7), LMS (needs scipy), and
    # samplers for distilled models (LCM, TCD).
    _compatibles = {
        "epsilon": _NOISE_SCHEDULE_SCHEDULERS,
        "v_prediction": _NOISE_SCHEDULE_SCHEDULERS,
        "flow_prediction": [
            "FlowMatchEulerDiscreteScheduler",
            "FlowMatchHeunDiscreteScheduler",
            "DPMSolverMultistepScheduler",
            "DPMSolverSinglestepScheduler",
            "UniPCMultistepScheduler",
        ],
    }

    @staticmethod
    def scheduler_prediction_type(scheduler: SchedulerMixin) -> str:
        """The units a scheduler expects from the model: its `prediction_type`, or `"flow_prediction"` for the
        flow-matching schedulers, which have no such field."""
        if "prediction_type" in scheduler.config:
            return scheduler.config.prediction_type
        return "flow_prediction" if type(scheduler).__name__.startswith("FlowMatch") else "epsilon"

    @classmethod
    def compatible_schedulers(cls, prediction_type: str) -> list[type[SchedulerMixin]]:
        """The diffusers scheduler classes of `_compatibles` for a model of `prediction_type`.

        Args:
            prediction_type (`str`): `"epsilon"`, `"v_prediction"` or `"flow_prediction"` (`config.prediction_type`).
        """
        if prediction_type not in cls._compatibles:
            raise ValueError(f"`prediction_type` must be one of {sorted(cls._compatibles)}, got {prediction_type!r}.")
        return [getattr(diffusers, name) for name in cls._compatibles[prediction_type]]

    @classmethod
    def scheduler_from_config(
        cls,
        scheduler_class: str | type[SchedulerMixin],
        config: FrozenDict | dict,
        prediction_type: str,
        **kwargs,
    ) -> SchedulerMixin:
        """Build a compatible scheduler from another scheduler's config (diffusers' `from_config`), set up for a model
        of `prediction_type`: the noise schedule the model was trained on (betas, number of training steps, the shift
        of a flow schedule, carried over between `shift` (FlowMatch) and `flow_shift` (solvers)), its
        `prediction_type`, and flow sigmas for multistep solvers on a flow model.

        Args:
            scheduler_class (`str` or `type`): a class of `_compatibles[prediction_type]`, or its name.
            config (`FrozenDict` or `dict`): a scheduler config, e.g. `pipe.scheduler.config` or the training one.
            prediction_type (`str`): the model's `config.prediction_type`.
            kwargs: further config overrides (e.g. `timestep_spacing="leading"`).

        Example: `pipe.scheduler = TransfusionPipeline.scheduler_from_config("UniPCMultistepScheduler",
        pipe.scheduler.config, pipe.transformer.config.prediction_type)`.
        """
        name = scheduler_class if isinstance(scheduler_class, str) else scheduler_class.__name__
        allowed = [compatible.__name__ for compatible in cls.compatible_schedulers(prediction_type)]
        if name not in allowed:
            raise ValueError(
                f"The scheduler {name} does not fit a model with prediction_type={prediction_type!r}: use one of "
                f"{allowed}."
            )
        scheduler_class = getattr(diffusers, name)
        parameters = inspect.signature(scheduler_class.__init__).parameters
        # `from_config` gives a different class its own defaults for every field the source config left at its
        # default (HeunDiscrete: beta_end=0.012 against DDPM's 0.02), which would sample another noise schedule than
        # the model learned: the schedule is passed explicitly.
        schedule = (
            "num_train_timesteps",
            "beta_start",
            "beta_end",
            "beta_schedule",
            "trained_betas",
            "rescale_betas_zero_snr",
        )
        overrides = {key: config[key] for key in schedule if key in config and key in parameters}
        if "prediction_type" in parameters:
            overrides["prediction_type"] = prediction_type
        if prediction_type == "flow_prediction" and "use_flow_sigmas" in parameters:
            overrides["use_flow_sigmas"] = True
        if "flow_shift" in parameters and "shift" in config:
            overrides["flow_shift"] = config["shift"]
        if "shift" in parameters and "flow_shift" in config:
            overrides["shift"] = config["flow_shift"]
        return scheduler_class.from_config(config, **{**overrides, **kwargs})

    @classmethod
    def pixel_range_clamp(cls, scheduler_class: str | type[SchedulerMixin]) -> dict[str, Any]:
        """The config fields with which `scheduler_class` clamps the clean image it implies at every step to the
        pixel range [-1, 1]: `clip_sample` (DDPM, DDIM: the DDPM paper's sampler) or `thresholding` with
        `sample_max_value=1` (the multistep solvers); empty for a class that cannot (Euler, the flow schedulers).

        Only for a model in pixel space: an epsilon or v model's implied x0 divides its error by alpha_t at high
        noise, and a stochastic sampler with the clamp draws what a deterministic one without it does not (README,
        "Sampling in pixel space"). The pipeline turns both fields off when it has a VAE.

        Args:
            scheduler_class (`str` or `type`): a diffusers scheduler class, or its name.
        """
        if isinstance(scheduler_class, str):
            if not isinstance(getattr(diffusers, scheduler_class, None), type):
                raise ValueError(f"`scheduler_class`={scheduler_class!r} is not a diffusers scheduler class.")
            scheduler_class = getattr(diffusers, scheduler_class)
        parameters = inspect.signature(scheduler_class.__init__).parameters
        if "clip_sample" in parameters:
            return {"clip_sample": True, "clip_sample_range": 1.0}
        if "thresholding" in parameters:
            # diffusers' dynamic thresholding clamps to s = quantile(|x0|) limited to [1, sample_max_value]: s = 1.
            return {"thresholding": True, "sample_max_value": 1.0}
        return {}

    @classmethod
    def epsilon_start_below_zero_snr(cls, scheduler_class: str | type[SchedulerMixin]) -> dict[str, Any]:
        """Config fields with which `scheduler_class` samples an epsilon model on DDPM's cosine schedule from the top of
        the schedule at every step count, without dividing by its zero SNR.

        The cosine schedule's t = 999 has alpha_bar ~ 2e-9: there an epsilon prediction says nothing about the image
        (x0 = (x_t - sigma * eps) / 5e-5). diffusers' "leading" spacing avoids it by starting lower, but how much lower
        depends on the step count (951 at 25 steps, 901 at 100, 751 at 250) while sampling always starts from pure
        noise: more steps sampled worse. The solvers with `lambda_min_clipped` (DPM-Solver, SA-Solver) instead cut the
        schedule where half the log-SNR falls below `EPSILON_LAMBDA_MIN` (t = 995, alpha_bar 4e-5: pure noise to
        0.6%) and space the steps evenly from there ("linspace"), so every step count starts at t = 995. Other classes
        keep "leading" spacing: `DDIMScheduler` / `DDPMScheduler` clip the clean image in pixel space, and the
        Euler-type schedulers work in sigma and never divide by alpha.

        Args:
            scheduler_class (`str` or `type`): a diffusers scheduler class, or its name.
        """
        if isinstance(scheduler_class, str):
            scheduler_class = getattr(diffusers, scheduler_class)
        parameters = inspect.signature(scheduler_class.__init__).parameters
        if "lambda_min_clipped" in parameters:
            fields = {"lambda_min_clipped": EPSILON_LAMBDA_MIN}
            if "timestep_spacing" in parameters:
                fields["timestep_spacing"] = "linspace"
            return fields
        return {"timestep_spacing": "leading", "steps_offset": 1}

    @classmethod
    def _checked_scheduler(
        cls, transformer: PreTrainedModel, scheduler: SchedulerMixin, vae: AutoencoderKL | None
    ) -> SchedulerMixin:
        """Refuse a scheduler that predicts other units than the model; turn off DDPM/DDIM sample clipping."""
        model_type = transformer.config.prediction_type
        scheduler_type = cls.scheduler_prediction_type(scheduler)
        if scheduler_type != model_type:
            raise ValueError(
                f"The scheduler {type(scheduler).__name__} has prediction_type={scheduler_type!r} but the model "
                f"predicts {model_type!r}: build the scheduler with prediction_type={model_type!r}."
            )
        clamps = [key for key in ("clip_sample", "thresholding") if scheduler.config.get(key, False)]
        if clamps and vae is not None:
            # Clamping x0 to the pixel range is meant for pixels (diffusers' docs say so of thresholding too); on
            # latents it ruins every sample.
            logger.warning(
                f"{type(scheduler).__name__} has {' and '.join(f'{key}=True' for key in clamps)}, which is wrong for "
                "latents: setting it to False."
            )
            scheduler = type(scheduler).from_config(scheduler.config, **dict.fromkeys(clamps, False))
        if scheduler_type == "flow_prediction" and scheduler.config.get("use_flow_sigmas") is False:
            # multistep solvers (DPMSolver, UniPC, DEIS) with prediction_type="flow_prediction" keep VP sigmas
            # and timesteps unless use_flow_sigmas=True: a perfect flow model then lands hundreds off x0.
            logger.warning(
                f"{type(scheduler).__name__} has prediction_type='flow_prediction' but use_flow_sigmas=False, "
                "which does not follow the flow-matching path: setting use_flow_sigmas=True."
            )
            scheduler = type(scheduler).from_config(scheduler.config, use_flow_sigmas=True)
        return scheduler


__all__ = ["EPSILON_LAMBDA_MIN", "TransfusionSchedulerMixin"]
