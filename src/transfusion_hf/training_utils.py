"""Training helpers shared by the example scripts: crash-safe checkpoints, loss checks, optimizer groups, logging."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import torch
from accelerate.utils import broadcast
from torch import nn

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a checkpoint only gets its final name once fully written)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in root.iterdir() if (match := CHECKPOINT_PATTERN.match(path.name))]
    return [path for _, path in sorted(found)]


def save_checkpoint(accelerator, output_dir: str | os.PathLike, step: int, total_limit: int | None = None) -> Path:
    """Save the accelerator state atomically: write into a temporary folder, then rename it.

    A kill during the write leaves only a `.tmp-` folder that resume ignores, so the previous checkpoint stays usable.
    Older checkpoints beyond `total_limit` are removed after the new one exists.

    Returns:
        The checkpoint folder `output_dir/checkpoint-{step}`.
    """
    root = Path(output_dir)
    final = root / f"checkpoint-{step}"
    temporary = root / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    # Every process writes files of its own (its RNG state; under FSDP its shards of the model and optimizer), and
    # `save_state` ends without a barrier: the main process must not rename the folder before they are all written
    # (measured with FSDP on CPU: process 1 found no `.tmp-checkpoint-N` folder left to write into).
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (temporary / "training_state.json").write_text(json.dumps({"global_step": step}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        if total_limit is not None and total_limit > 0:
            for old in list_checkpoints(root)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_checkpoint(output_dir: str | os.PathLike, resume_from_checkpoint: str | None) -> Path | None:
    """`"latest"` -> the newest complete checkpoint of `output_dir` (None when there is none); a path -> that path."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    if not (path / "training_state.json").is_file():
        raise ValueError(f"`resume_from_checkpoint`={resume_from_checkpoint!r} is not a complete checkpoint folder.")
    return path


def checkpoint_step(checkpoint: Path) -> int:
    return int(json.loads((checkpoint / "training_state.json").read_text())["global_step"])


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite."""


def check_finite(loss: torch.Tensor, step: int, last_checkpoint: Path | None) -> None:
    """Stop a run whose loss is NaN or inf, naming the step and the checkpoint to resume from."""
    if not torch.isfinite(loss).all():
        where = str(last_checkpoint) if last_checkpoint is not None else "none (no checkpoint was saved yet)"
        # `loss` may hold one value per process (gathered), where `.item()` raised.
        value = loss.item() if loss.numel() == 1 else loss.tolist()
        raise NonFiniteLossError(
            f"The loss is {value} at step {step}; training stopped. Last good checkpoint: {where}. "
            "Lower the learning rate or check the data, then resume with --resume_from_checkpoint."
        )


class CleanImageErrorTracker:
    """Error of the clean image implied by the model's predictions, per timestep bucket, against the mean image.

    A diffusion loss can fall while the model predicts the mean image at high noise, where layout is decided (an
    epsilon MSE weights the clean-image error by SNR, which is almost 0 there), and samples then collapse to the mean
    image. Logged per bucket as `x0_error_ratio/t<lo>-<hi>`: the median over the bucket's images of (MSE of the
    implied x0) / (MSE of the batch's mean image). 1.0 is no better than the mean image; a working model goes well
    below 1 in every bucket. The median, because an epsilon model's implied x0 near t = 1000 divides by
    sqrt(alpha_bar) ~ 5e-5 and one such image would swamp a mean.

    Args:
        noiser (`TransfusionNoiser`): converts predictions and targets to clean images.
        num_buckets (`int`, defaults to 4): equal slices of `[0, num_train_timesteps]`.
    """

    def __init__(self, noiser, num_buckets: int = 4):
        self.noiser = noiser
        self.num_buckets = num_buckets
        self.reset()

    def reset(self) -> None:
        self.ratios: list[list[torch.Tensor]] = [[] for _ in range(self.num_buckets)]

    @torch.no_grad()
    def update(self, batch: dict, predictions: torch.Tensor | None) -> None:
        """Add one batch.

        Args:
            batch (`dict`): the collator's batch (`latents`, `timesteps`, `diffusion_targets`).
            predictions (`torch.Tensor` of shape `(num_images, C, H, W)`): the model's diffusion predictions.
        """
        if predictions is None or predictions.shape[0] < 2:
            return
        timesteps = batch["timesteps"]
        clean = self.noiser.predict_clean(batch["latents"], batch["diffusion_targets"], timesteps)
        predicted = self.noiser.predict_clean(batch["latents"], predictions.detach(), timesteps)
        model_error = (predicted - clean).pow(2).flatten(1).mean(1)
        mean_image_error = (clean.mean(0, keepdim=True) - clean).pow(2).flatten(1).mean(1)
        # An image equal to the batch mean (e.g. a batch of one repeated image) has no baseline to compare with.
        has_baseline = (mean_image_error > 1e-8).cpu()
        ratio = (model_error / mean_image_error.clamp_min(1e-8)).cpu()
        fraction = timesteps.float().cpu() / self.noiser.num_train_timesteps
        bucket = (fraction * self.num_buckets).long().clamp(0, self.num_buckets - 1)
        for index in range(self.num_buckets):
            self.ratios[index].append(ratio[(bucket == index) & has_baseline])

    def compute(self) -> dict[str, float]:
        """The median ratios of the batches since the last reset (buckets without images left out), then reset."""
        width = self.noiser.num_train_timesteps // self.num_buckets
        result = {}
        for index, parts in enumerate(self.ratios):
            values = torch.cat(parts) if parts else torch.empty(0)
            if values.numel():
                result[f"x0_error_ratio/t{index * width}-{(index + 1) * width}"] = float(values.median())
        self.reset()
        return result


def weight_decay_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups of the trainable parameters: `weight_decay` on the weights of linear and conv layers,
    none on biases, norms and embeddings.

    Biases and norms are transformers' convention, `Trainer.get_decay_parameter_names` (by name pattern and
    `nn.LayerNorm`). It keeps decay on embeddings and on `nn.GroupNorm` (the U-Net patch layers' norms, named `norm1`,
    `norm2`, `norm_out`, which its patterns miss); those layer types, and peft's trainable rows of new tokens (rows of
    the embedding), are taken out here with transformers' `get_parameter_names`.

    Args:
        model (`nn.Module`): the model (or its peft wrapper); parameters with `requires_grad=False` are left out.
        weight_decay (`float`): the decay of the first group.

    Returns:
        `list[dict]`: `[{"params": [...], "weight_decay": weight_decay}, {"params": [...], "weight_decay": 0.0}]`.
    """
    from peft.tuners.trainable_tokens import TrainableTokensLayer
    from transformers import Trainer
    from transformers.trainer_pt_utils import get_parameter_names

    # `get_decay_parameter_names` is a method that reads nothing from the Trainer: called without one, it gives
    # exactly the Trainer's rule instead of a copy of its patterns.
    by_trainer = set(Trainer.get_decay_parameter_names(None, model))
    not_embedding_or_group_norm = set(get_parameter_names(model, [nn.Embedding, nn.GroupNorm, TrainableTokensLayer]))
    decay = by_trainer & not_embedding_or_group_norm
    groups: list[dict] = [{"params": [], "weight_decay": weight_decay}, {"params": [], "weight_decay": 0.0}]
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            groups[0 if name in decay else 1]["params"].append(parameter)
    return groups


LOSS_KEYS = ("loss", "lm_loss", "diffusion_loss")


class StepLosses:
    """The losses of one optimizer step, averaged over its gradient-accumulation micro-steps and over processes.

    A micro-step without images has no diffusion loss: each loss is averaged over the micro-steps that have it.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums = {key: 0.0 for key in LOSS_KEYS}
        self.counts = {key: 0 for key in LOSS_KEYS}

    def add(self, output) -> None:
        """Add the losses of one micro-step (a model output with `loss`, `lm_loss`, `diffusion_loss`)."""
        for key in LOSS_KEYS:
            value = getattr(output, key, None)
            if value is not None:
                self.sums[key] += float(value.detach())
                self.counts[key] += 1

    def compute(self, accelerator=None) -> dict[str, float]:
        """The mean of each loss, over every process when `accelerator` is given (a collective: every process must
        call it at the same step), then reset.

        Returns:
            `dict[str, float]`: the losses some micro-step had.
        """
        totals = torch.tensor([[self.sums[key], self.counts[key]] for key in LOSS_KEYS], dtype=torch.float64)
        if accelerator is not None and accelerator.num_processes > 1:
            totals = accelerator.reduce(totals.to(accelerator.device), reduction="sum").cpu()
        self.reset()
        return {key: float(total / count) for key, (total, count) in zip(LOSS_KEYS, totals.tolist()) if count}


class GradNormWindow:
    """The gradient norm between two log records: its mean before clipping and the share of steps that were clipped.

    transformers' `Trainer` logs `grad_norm` (the last step's); the mean and the clipped share say more about a window
    of steps, e.g. whether `max_grad_norm` rescales every update (then it acts as a second learning rate).

    Args:
        max_grad_norm (`float`): the clipping threshold (`--max_grad_norm`).
    """

    def __init__(self, max_grad_norm: float):
        self.max_grad_norm = max_grad_norm
        self.reset()

    def reset(self) -> None:
        self.total, self.count, self.clipped = 0.0, 0, 0

    def add(self, grad_norm: torch.Tensor | float | None) -> None:
        """One optimizer step's total norm before clipping (`Accelerator.clip_grad_norm_`'s return; None when the
        backend reports none, as DeepSpeed does)."""
        if grad_norm is None:
            return
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        value = float(grad_norm)
        self.total += value
        self.count += 1
        self.clipped += value > self.max_grad_norm

    def compute(self) -> dict[str, float]:
        """`{"grad_norm", "grad_clipped_fraction"}` over the steps since the last call (empty without any), then
        reset. The norm is already the global one (accelerate reduces it over processes)."""
        if not self.count:
            return {}
        record = {"grad_norm": self.total / self.count, "grad_clipped_fraction": self.clipped / self.count}
        self.reset()
        return record


class TrainingClock:
    """Wall time of a training run against its budget (`--max_train_time_minutes`), counted from `start()` and read
    at each `tick()`.

    Every process must agree on when the budget is spent (one that stopped alone would leave the others waiting in the
    next gradient all-reduce) and on the learning rate the budget implies (replicas with different rates drift apart),
    so `tick` takes the main process's reading.

    Args:
        budget_minutes (`float`, *optional*): the budget; without one the run never runs out of time.
    """

    def __init__(self, budget_minutes: float | None = None):
        self.budget_seconds = None if budget_minutes is None else 60.0 * budget_minutes
        self.started: float | None = None
        self.reading = 0.0

    def start(self) -> None:
        self.started, self.reading = time.time(), 0.0

    def tick(self, accelerator=None) -> None:
        """Read the time (once per optimizer step); with several processes, the main process's reading for all (one
        scalar broadcast, only when there is a budget)."""
        if self.started is None or self.budget_seconds is None:
            return
        elapsed = time.time() - self.started
        if accelerator is not None and accelerator.num_processes > 1:
            reading = torch.tensor([elapsed], dtype=torch.float64, device=accelerator.device)
            elapsed = float(broadcast(reading, from_process=0)[0])
        self.reading = elapsed

    def elapsed(self) -> float:
        """Seconds from `start()` to the last `tick()`."""
        return self.reading

    def fraction(self) -> float:
        """The spent share of the budget, from 0 (not started, or no budget) up; above 1 once it is spent."""
        return 0.0 if not self.budget_seconds else self.elapsed() / self.budget_seconds

    def out_of_time(self) -> bool:
        return self.budget_seconds is not None and self.elapsed() > self.budget_seconds


def follow_time_budget(scheduler: torch.optim.lr_scheduler.LambdaLR, clock: TrainingClock, total_steps: int) -> None:
    """Make a step-based `LambdaLR` schedule (any of `transformers.get_scheduler`'s) advance with the time budget too:
    at step `s` it gives the factor of step `max(s, clock.fraction() * total_steps)`, capped at the last step. A run
    whose steps do not fit the budget thus still warms up and decays to the schedule's end when the time runs out; one
    that fits follows its steps. Budgeted training decays to the end of the budget (Li et al., 2020, "Budgeted
    Training"); transformers and accelerate have no such schedule, so it wraps theirs.

    The wrappers are plain closures, so `LambdaLR.state_dict` leaves them out of checkpoints (it saves only the step);
    the clock of a resumed run restarts with the run, as its time budget does.
    """

    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise ValueError(f"A time budget can only move a LambdaLR schedule, not {type(scheduler).__name__}.")

    def follow(factor_of_step):
        def at_time_or_step(step: int) -> float:
            # The schedule's last step is total_steps - 1 (the factor of a full run's last update); past it some
            # schedules rise again (cosine with a floor).
            return factor_of_step(min(max(step, clock.fraction() * total_steps), total_steps - 1))

        return at_time_or_step

    # The first learning rate was set at construction, before the clock starts: the step schedule's own, unchanged.
    scheduler.lr_lambdas = [follow(factor) for factor in scheduler.lr_lambdas]


def num_real_tokens(batch: dict, pad_token_id: int | None) -> int:
    """Tokens of a batch that are not padding: the attention mask's, or for packed rows (no attention mask) those
    that are not `pad_token_id` (transformers' `Trainer` counts "non_padding" tokens the same way; a tokenizer whose
    pad token is its EOS then leaves the EOS tokens out)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if pad_token_id is None:
        return batch["input_ids"].numel()
    return int((batch["input_ids"] != pad_token_id).sum())


__all__ = [
    "CleanImageErrorTracker",
    "list_checkpoints",
    "save_checkpoint",
    "resolve_checkpoint",
    "checkpoint_step",
    "NonFiniteLossError",
    "check_finite",
    "weight_decay_parameter_groups",
    "StepLosses",
    "num_real_tokens",
]
