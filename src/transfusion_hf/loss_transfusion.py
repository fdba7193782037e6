"""The two Transfusion losses (paper, section 3.3): next-token cross-entropy on text and per-image diffusion MSE."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_labels(
    labels: torch.LongTensor,
    input_ids: torch.LongTensor,
    no_loss_input_ids: tuple[int, ...],
    attention_mask: torch.Tensor | None = None,
) -> torch.LongTensor:
    """The target of every position: `labels[i + 1]` at position `i`, `-100` where no loss is taken.

    No loss where the input at `i` is an image placeholder (image positions are trained by diffusion) or `<boi>` (the
    first patch is not a token; paper footnote), where the input or the next one is padding, where the label is
    `-100`, and at the last position (nothing follows it). The token before `<boi>` does learn to emit `<boi>`.

    Args:
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`): usually `input_ids`, `-100` to ignore.
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`).
        no_loss_input_ids (`tuple[int, ...]`): input ids whose position gets no loss (`<boi>`, `<image>`).
        attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*): 0 at padding.

    Returns:
        `torch.LongTensor` of shape `(batch_size, sequence_length)`.
    """
    ignored = torch.isin(input_ids[:, :-1], torch.tensor(no_loss_input_ids, device=input_ids.device))
    if attention_mask is not None:
        ignored |= attention_mask[:, :-1] == 0
        ignored |= attention_mask[:, 1:] == 0
    targets = labels[:, 1:].masked_fill(ignored, -100)
    return torch.cat([targets, targets.new_full((targets.shape[0], 1), -100)], dim=1)


def language_modeling_loss(
    logits: torch.Tensor,
    labels: torch.LongTensor,
    input_ids: torch.LongTensor,
    no_loss_input_ids: tuple[int, ...],
    attention_mask: torch.Tensor | None = None,
    position_index: torch.LongTensor | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy over text positions only (which positions count: [`next_token_labels`]).

    Args:
        logits (`torch.Tensor` of shape `(batch_size, sequence_length, vocab_size)`, or `(num_positions,
            vocab_size)` with `position_index`): the logits of every position, or of some of them.
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`): usually `input_ids`, `-100` to ignore.
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`).
        no_loss_input_ids (`tuple[int, ...]`): input ids whose position gets no loss (`<boi>`, `<image>`).
        attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*): 0 at padding.
        position_index (`torch.LongTensor` of shape `(num_positions,)`, *optional*): the flat positions
            (`row * sequence_length + column`) that `logits` hold; every position that takes a loss must be among
            them (the model passes all but the image placeholders, which never do).

    Returns:
        Scalar mean over the counted positions (0 when there are none, so image-only batches still train).
    """
    targets = next_token_labels(labels, input_ids, no_loss_input_ids, attention_mask).reshape(-1)
    if position_index is not None:
        targets = targets.index_select(0, position_index)
    # Sum over the counted positions divided by their count (at least 1), rather than a branch on "any counted?":
    # the same mean, an exact 0 (and zero gradients) when nothing counts, and no data-dependent Python branch, so a
    # compiled training step keeps one graph (tests/test_compile.py).
    summed = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets, ignore_index=-100, reduction="sum")
    return summed / (targets != -100).sum().clamp(min=1)


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
