"""The parts of a training run that the loop, the validation and the final save share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import AutoencoderKL
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.training_utils import EMAModel
from transformers import PreTrainedTokenizerBase

from ..data.collator import TransfusionDataCollator
from ..noising import TransfusionNoiser
from ..processing_transfusion import TransfusionProcessor
from .monitoring import CleanImageErrorTracker, GradNormWindow
from .optimization import TrainingClock


@dataclass
class TrainingComponents:
    """What the training loop, `run_validation` and `save_final` use besides the model and the optimizer.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): the run's tokenizer (saved with the pipeline).
        processor (`TransfusionProcessor`): lays out the sequences.
        noiser (`TransfusionNoiser`): the training noise of the run's objective.
        collator (`TransfusionDataCollator`): the training collator (its `num_truncated` is logged).
        inference_scheduler (`SchedulerMixin`): the sampler saved with the pipeline and used for validation grids.
        vae (`AutoencoderKL`, *optional*): the frozen VAE, None in pixel space.
        examples (`list[dict]`): the validation examples (`text`, `latents`), spread over the data set.
        ema (`EMAModel`, *optional*): the average of the trainable weights (`--use_ema`).
        stream (*optional*): the streaming batches (`--streaming`), whose skipped-image count is logged.
        clean_error (`CleanImageErrorTracker`), grad_norms (`GradNormWindow`), clock (`TrainingClock`): the run's
            measurements between two log records.
        text_validation_batches (`list[dict]`): the held-out text-only batches of `eval/text_lm_loss`.
    """

    tokenizer: PreTrainedTokenizerBase
    processor: TransfusionProcessor
    noiser: TransfusionNoiser
    collator: TransfusionDataCollator
    inference_scheduler: SchedulerMixin
    clean_error: CleanImageErrorTracker
    grad_norms: GradNormWindow
    clock: TrainingClock
    vae: AutoencoderKL | None = None
    examples: list[dict] = field(default_factory=list)
    ema: EMAModel | None = None
    stream: Any = None
    text_validation_batches: list[dict[str, torch.Tensor]] = field(default_factory=list)
    # Sequences cut to the context already logged, and whether the "no gap" warning was given.
    truncated_logged: int = 0
    gap_skip_warned: bool = False
