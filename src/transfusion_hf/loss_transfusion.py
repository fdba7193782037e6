"""The two Transfusion losses (paper, section 3.3): next-token cross-entropy on text and per-image diffusion MSE."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def language_modeling_loss(
    logits: torch.Tensor,
    labels: torch.LongTensor,
    input_ids: torch.LongTensor,
    no_loss_input_ids: tuple[int, ...],
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy over text positions only.

    Position `i` predicts `labels[i + 1]`. No loss where the input at `i` is an image placeholder (image positions
    are trained by diffusion) or `<boi>` (the first patch is not a token; paper footnote), where the input is
    padding, nor where the label is `-100`. The token before `<boi>` does learn to emit `<boi>`.

    Args:
        logits (`torch.Tensor` of shape `(batch_size, sequence_length, vocab_size)`).
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`): usually `input_ids`, `-100` to ignore.
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`).
        no_loss_input_ids (`tuple[int, ...]`): input ids whose position gets no loss (`<boi>`, `<image>`).
        attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*): 0 at padding.

    Returns:
        Scalar mean over the counted positions (0 when there are none, so image-only batches still train).
    """
    shift_logits = logits[:, :-1, :]
    position_inputs = input_ids[:, :-1]
    ignored = torch.isin(position_inputs, torch.tensor(no_loss_input_ids, device=input_ids.device))
    if attention_mask is not None:
        ignored |= attention_mask[:, :-1] == 0
        ignored |= attention_mask[:, 1:] == 0
    shift_labels = labels[:, 1:].masked_fill(ignored, -100)
    # Sum over the counted positions divided by their count (at least 1), rather than a branch on "any counted?":
    # the same mean, an exact 0 (and zero gradients) when nothing counts, and no data-dependent Python branch, so a
    # compiled training step keeps one graph (tests/test_compile.py).
    summed = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]).float(),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return summed / (shift_labels != -100).sum().clamp(min=1)


def diffusion_loss(
    predictions: torch.Tensor | list[torch.Tensor],
    targets: torch.Tensor | list[torch.Tensor],
    loss_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error per image (mean over its channels and pixels), then averaged over images.

    Averaging per image first keeps every image's weight equal whatever the batch layout (paper, section 3.3).

    Args:
        predictions (`torch.Tensor` of shape `(num_images, C, H, W)`, or a list of `(C, H_i, W_i)` for images of
            different sizes).
        targets (same form as `predictions`, or a list for either form): a list entry may be None for an image that
            is clean context (t = 0, e.g. the source image of an edit), which takes no loss; the mean is over the
            others.
        loss_weights (`torch.Tensor` of shape `(num_images,)` (or one per image with a target), *optional*): weights (min-SNR-gamma, see
            `TransfusionNoiser`), applied before the mean over images as in diffusers' training scripts.

    Returns:
        Scalar tensor.
    """
    if isinstance(targets, (list, tuple)):
        # One target per image; None for an image given as clean context (t = 0), which takes no loss.
        per_prediction = list(predictions)
        if len(targets) != len(per_prediction):
            raise ValueError(
                f"`diffusion_targets` has {len(targets)} entries but there are {len(per_prediction)} images: one per "
                "image like `latents` (None for a clean context image)."
            )
        kept = [index for index, target in enumerate(targets) if target is not None]
        for index in kept:
            if per_prediction[index].shape != targets[index].shape:
                raise ValueError(
                    f"`diffusion_targets[{index}]` has shape {tuple(targets[index].shape)}, expected "
                    f"{tuple(per_prediction[index].shape)}."
                )
        if not kept:  # only context images: no diffusion loss, but a graph for the backward of a mixed step
            return sum(prediction.float().sum() for prediction in per_prediction) * 0.0
        per_image = torch.stack(
            [(per_prediction[index].float() - targets[index].float()).pow(2).mean() for index in kept]
        )
        if loss_weights is not None and loss_weights.shape == (len(per_prediction),):
            loss_weights = loss_weights[kept]
    elif isinstance(predictions, (list, tuple)):
        raise ValueError("`diffusion_targets` must be a list, one per image, like `latents` of mixed sizes.")
    else:
        if not isinstance(targets, torch.Tensor) or predictions.shape != targets.shape:
            shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
            raise ValueError(
                f"`diffusion_targets` has shape {shape}, expected {tuple(predictions.shape)} "
                "(one target per image, like `latents`)."
            )
        per_image = (predictions.float() - targets.float()).pow(2).flatten(1).mean(dim=1)
    if loss_weights is not None:
        if loss_weights.shape != per_image.shape:
            raise ValueError(
                f"`diffusion_loss_weights` has shape {tuple(loss_weights.shape)}, expected {tuple(per_image.shape)} "
                "(one weight per image)."
            )
        per_image = per_image * loss_weights.to(per_image)
    return per_image.mean()


__all__ = ["language_modeling_loss", "diffusion_loss"]
