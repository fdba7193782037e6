"""Measurements of a run in progress: the step's losses, gradient norms, clean-image error, token throughput, and the
check that stops a diverged run.
"""

from __future__ import annotations

from pathlib import Path

import torch


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
        if not isinstance(predictions, torch.Tensor):  # images of mixed sizes (a list): not tracked
            return
        latents, targets, timesteps = batch["latents"], batch["diffusion_targets"], batch["timesteps"]
        if isinstance(targets, (list, tuple)):
            # Interleaved documents: only the noised images (with a target) have an implied clean image to compare.
            noised = [index for index, target in enumerate(targets) if target is not None]
            if not noised:
                return
            targets = torch.stack([targets[index] for index in noised])
            latents, timesteps, predictions = latents[noised], timesteps[noised], predictions[noised]
        if predictions.shape[0] < 2:
            return
        clean = self.noiser.predict_clean(latents, targets, timesteps)
        predicted = self.noiser.predict_clean(latents, predictions.detach(), timesteps)
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


def num_real_tokens(batch: dict, pad_token_id: int | None) -> int:
    """Tokens of a batch that are not padding: the attention mask's, or for packed rows (no attention mask) those
    that are not `pad_token_id` (transformers' `Trainer` counts "non_padding" tokens the same way; a tokenizer whose
    pad token is its EOS then leaves the EOS tokens out)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if pad_token_id is None:
        return batch["input_ids"].numel()
    return int((batch["input_ids"] != pad_token_id).sum())
