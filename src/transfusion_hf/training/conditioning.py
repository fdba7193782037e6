"""Does the model follow the text? The diffusion loss with each image's own caption against another image's caption.

A model that draws what the prompt says denoises an image better when it reads that image's caption than when it reads
the caption of another image; a model that has only learned what the images look like does equally well with either,
and its samples ignore the prompt however good they look. Both losses are computed on the same noisy latents (same
noise, same t), so their difference is the text's share of the prediction and nothing else. Reported per band of
timesteps: the prompt decides the layout at high noise, and a model that follows it shows the gap there first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..modeling_transfusion import TransfusionForMixedModal
from ..noising import TransfusionNoiser
from ..processing_transfusion import TransfusionProcessor, pad_sequences


@dataclass
class TextConditioningGap:
    """Mean per-image diffusion loss (in the units of the prediction type) with the own and with a shuffled caption.

    Args:
        own_loss (`dict[str, float]`): per timestep band (`"t0-250"`, ...), with each image's own caption.
        shuffled_loss (`dict[str, float]`): the same images, noise and times, with the caption of another image.
        num_pairs (`int`): images measured (each with a partner whose caption differs from its own).
    """

    own_loss: dict[str, float]
    shuffled_loss: dict[str, float]
    num_pairs: int

    @property
    def relative_gap(self) -> dict[str, float]:
        """`shuffled / own - 1` per band: ~0 for a model that ignores the text, > 0 for one that reads it."""
        return {band: self.shuffled_loss[band] / max(self.own_loss[band], 1e-12) - 1 for band in self.own_loss}

    def log_record(self, prefix: str = "text_gap") -> dict[str, float]:
        """Flat scalars for a tracker / the json log: the relative gap per band and over all bands."""
        record = {f"{prefix}/{band}": round(gap, 6) for band, gap in self.relative_gap.items()}
        own, shuffled = sum(self.own_loss.values()), sum(self.shuffled_loss.values())
        record[f"{prefix}/all"] = round(shuffled / max(own, 1e-12) - 1, 6)
        return record


def derangement_partner(captions: Sequence[str]) -> list[int]:
    """For each pair, another pair with a different caption (the next one that differs, cyclically), or itself when
    every caption is the same."""
    partners = []
    for index, caption in enumerate(captions):
        partner = index
        for offset in range(1, len(captions)):
            candidate = (index + offset) % len(captions)
            if captions[candidate] != caption:
                partner = candidate
                break
        partners.append(partner)
    return partners


@torch.no_grad()
def text_conditioning_gap(
    model: TransfusionForMixedModal,
    processor: TransfusionProcessor,
    noiser: TransfusionNoiser,
    captions: Sequence[str],
    clean_latents: torch.Tensor | list[torch.Tensor],
    num_bands: int = 4,
    seed: int = 0,
    batch_size: int = 32,
) -> TextConditioningGap:
    """Measure the text-conditioning gap on image-caption pairs (laid out caption -> image, as text-to-image is).

    Args:
        model (`TransfusionForMixedModal`): the model (its train/eval mode is restored afterwards).
        processor (`TransfusionProcessor`): lays out `[bos] caption <boi> <image>*N <eoi> [eos]`.
        noiser (`TransfusionNoiser`): the run's noising (prediction type and schedule).
        captions (`Sequence[str]`): one caption per image.
        clean_latents (`torch.Tensor` or `list[torch.Tensor]`): the images' clean latents, `(num_pairs, C, H, W)`, or
            one `(C, H_i, W_i)` per pair for images of different sizes.
        num_bands (`int`): timestep bands; image `i` gets a time drawn uniformly in band `i % num_bands`.
        seed (`int`): seeds the times and the noise, so successive calls measure the same draws.
        batch_size (`int`): sequences per forward.

    Returns:
        [`TextConditioningGap`].
    """
    if len(captions) != len(clean_latents) or len(captions) < 2:
        raise ValueError(
            f"`captions` ({len(captions)}) and `clean_latents` ({len(clean_latents)}) must hold the same number of "
            "pairs, at least 2."
        )
    if len(set(captions)) < 2:
        raise ValueError("Every caption is the same: a shuffled caption cannot differ from the own one.")
    # With two captions or more, every pair has a partner whose caption differs from its own.
    partners = derangement_partner(captions)
    generator = torch.Generator().manual_seed(seed)
    top = noiser.num_train_timesteps if noiser.prediction_type == "flow_prediction" else noiser.num_train_timesteps - 1
    bands = torch.arange(len(captions)) % num_bands
    fractions = (bands + torch.rand(len(captions), generator=generator)) / num_bands
    timesteps = fractions * top
    if noiser.prediction_type != "flow_prediction":
        timesteps = timesteps.long()
    device = next(model.parameters()).device
    if isinstance(clean_latents, torch.Tensor):
        noised = noiser.add_noise(clean_latents.float(), timesteps, generator)
        noisy, targets, times = noised.latents, noised.targets, noised.timesteps
    else:  # images of different sizes: noised one at a time, in order
        draws = [
            noiser.add_noise(image[None].float(), timesteps[i : i + 1], generator)
            for i, image in enumerate(clean_latents)
        ]
        noisy, targets = [draw.latents[0] for draw in draws], [draw.targets[0] for draw in draws]
        times = torch.cat([draw.timesteps for draw in draws])
    was_training = model.training
    model.eval()
    losses = {}
    for name, order in (("own", list(range(len(captions)))), ("shuffled", partners)):
        per_image = []
        for start in range(0, len(captions), batch_size):
            stop = min(start + batch_size, len(captions))
            # Each image takes the placeholders of its own size (the default size's count for a default image).
            blocks = [model.config.num_patches_for(*noisy[i].shape[-2:]) for i in range(start, stop)]
            sequences = [
                processor.encode_parts([captions[order[i]], blocks[i - start]], add_bos=True, add_eos=True)
                for i in range(start, stop)
            ]
            input_ids, attention_mask = pad_sequences(sequences, processor.tokenizer.pad_token_id, "right")
            batch_latents = noisy[start:stop]
            output = model(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                latents=[image.to(device, model.dtype) for image in batch_latents]
                if isinstance(batch_latents, list)
                else batch_latents.to(device, model.dtype),
                timesteps=times[start:stop].to(device),
                skip_logits=True,  # only the image predictions are read: no LM head
            )
            predictions = output.diffusion_predictions
            if isinstance(predictions, torch.Tensor):  # one size: one reduction for the batch
                batch_targets = targets[start:stop].to(device).float()
                per_image.append((predictions.float() - batch_targets).pow(2).mean(dim=(1, 2, 3)).cpu())
            else:
                per_image.append(
                    torch.stack(
                        [
                            (prediction.float() - target.to(device).float()).pow(2).mean()
                            for prediction, target in zip(predictions, targets[start:stop])
                        ]
                    ).cpu()
                )
        losses[name] = torch.cat(per_image)
    model.train(was_training)
    width = noiser.num_train_timesteps // num_bands
    own, shuffled = {}, {}
    for band in range(num_bands):
        members = bands == band
        if not members.any():
            continue
        label = f"t{band * width}-{(band + 1) * width}"
        own[label] = float(losses["own"][members].mean())
        shuffled[label] = float(losses["shuffled"][members].mean())
    return TextConditioningGap(own, shuffled, len(captions))
