#!/usr/bin/env python
"""Train a small diffusers `AutoencoderKL` for Transfusion's latent space, on the same data sources as
examples/train_transfusion.py (the built-in shapes or glyphs, a local image folder, webdataset shards, or a Hub data
set).

    accelerate launch examples/train_vae.py --dataset_name shapes --output_dir outputs/vae --max_train_steps 3000
    accelerate launch examples/train_transfusion.py --dataset_name shapes --vae_name_or_path outputs/vae ...

The images are read lazily: the data set stays on disk (memory-mapped Arrow) and a `datasets` transform decodes,
resizes (`--resolution`, `--center_crop`), mirrors (`--random_flip`) and normalises each batch to [-1, 1] when the
DataLoader draws it, so memory does not grow with the data set. Only the `--num_eval_images` held-out images are kept
in memory; the latent statistics are measured on `--num_statistics_images` training images, a batch at a time. An
unreadable image is skipped (or fails the run with `--strict_data`) and counted: `skipped_images` in the training log
and in `vae_metrics.json`. Every flag is checked before any data is read.

The loss is a pixel reconstruction loss (L1 or MSE) plus a small KL term towards N(0, I) on the posterior. After
training, the latents of the training images set the VAE's `shift_factor` (their mean) and `scaling_factor` (1 / their
standard deviation), so that `(z - shift_factor) * scaling_factor` has unit variance, as the diffusion noise schedule
assumes. The folder written by `save_pretrained` also holds `vae_metrics.json` (reconstruction error on held-out
images, latent statistics) and `reconstructions.png` (held-out images above their reconstructions).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import NamedTuple

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from diffusers import AutoencoderKL
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup_lr_rate

from transfusion_hf.data.image_text import (
    add_data_arguments,
    check_dataset_from_args,
    decode_rows,
    load_dataset_from_args,
)
from transfusion_hf.processing_transfusion import images_to_pixel_values
from transfusion_hf.training import build_accelerator
from transfusion_hf.visualization import make_grid

logger = logging.getLogger("train_vae")

# Flags checked before any data is read (see `check_args`).
POSITIVE_FLAGS = (
    "train_batch_size",
    "gradient_accumulation_steps",
    "max_train_steps",
    "resolution",
    "latent_channels",
    "layers_per_block",
    "norm_num_groups",
    "logging_steps",
    "num_statistics_images",
    "shapes_num_samples",
    "glyphs_num_samples",
    "learning_rate",
    "max_grad_norm",
)
NON_NEGATIVE_FLAGS = ("num_eval_images", "lr_warmup_steps", "kl_weight", "adam_weight_decay", "dataloader_num_workers")
# Without held-out rows (a data set of under 5 rows) the reconstructions are shown on this many training rows.
NUM_FALLBACK_EVAL_ROWS = 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line.

    Args:
        argv (`list[str]`, *optional*): the flags (default `sys.argv[1:]`).

    Raises:
        ValueError: a bad flag, named with its value (see [`check_args`]).
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = add_data_arguments(parser)
    data.add_argument("--num_eval_images", type=int, default=64, help="Held out to measure reconstruction error.")
    data.add_argument(
        "--num_statistics_images",
        type=int,
        default=1024,
        help="Training images (a seeded random sample) whose latents set scaling_factor and shift_factor.",
    )
    data.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=0,
        help="DataLoader worker processes decoding the images (0: decode in the training process).",
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "--block_out_channels",
        type=int,
        nargs="+",
        default=None,
        help=(
            "One encoder/decoder block per entry; the image is downsampled 2^(len - 1) times. Default: the most "
            "downsampling, up to 4x, that keeps 16x16 latents ([32, 64] at --resolution 32, [32, 64, 64] from 64)."
        ),
    )
    model.add_argument("--latent_channels", type=int, default=4)
    model.add_argument("--layers_per_block", type=int, default=1)
    model.add_argument("--norm_num_groups", type=int, default=32, help="GroupNorm groups; divides every block width.")

    optim = parser.add_argument_group("optimization")
    optim.add_argument("--reconstruction_loss", choices=["l1", "mse"], default="l1")
    optim.add_argument(
        "--kl_weight", type=float, default=1e-4, help="Weight of the KL term (mean over latent elements)."
    )
    optim.add_argument("--train_batch_size", type=int, default=32)
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument("--max_train_steps", type=int, default=2000)
    optim.add_argument("--learning_rate", type=float, default=1e-3)
    optim.add_argument("--lr_warmup_steps", type=int, default=100)
    optim.add_argument("--min_lr_ratio", type=float, default=0.1)
    optim.add_argument("--adam_weight_decay", type=float, default=0.0)
    optim.add_argument("--max_grad_norm", type=float, default=1.0)
    optim.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    optim.add_argument("--seed", type=int, default=0)

    run = parser.add_argument_group("output and logging")
    run.add_argument("--output_dir", default="outputs/vae")
    run.add_argument("--logging_steps", type=int, default=50)
    run.add_argument("--report_to", default="tensorboard", help="Accelerate trackers, or 'none'.")
    return check_args(parser.parse_args(argv))


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """Refuse bad flags before any data is read, so that a typo costs seconds, not a data set load.

    Args:
        args (`argparse.Namespace`): the flags of [`parse_args`].

    Raises:
        ValueError: naming the flag and its value.
    """
    if sum(source is not None for source in (args.dataset_name, args.train_data_dir, args.train_data_files)) != 1:
        raise ValueError(
            "Give exactly one data source: --dataset_name (or --dataset shapes), --train_data_dir or "
            f"--train_data_files; got --dataset_name={args.dataset_name!r}, --train_data_dir={args.train_data_dir!r}, "
            f"--train_data_files={args.train_data_files!r}."
        )
    for name in POSITIVE_FLAGS:
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}.")
    for name in NON_NEGATIVE_FLAGS:
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}.")
    if not 0 <= args.min_lr_ratio <= 1:
        raise ValueError(f"--min_lr_ratio must be in [0, 1], got {args.min_lr_ratio}.")
    check_model_args(args)
    check_dataset_from_args(args)
    return args


def default_block_out_channels(resolution: int) -> list[int]:
    """The VAE's blocks when `--block_out_channels` is not given: downsample as much as keeps 16x16 latents, at most
    4x. A 32 px image gets 2x: measured on 32 px photo crops (docs/research/recipes.md), a 4x VAE (8x8x4 latents,
    29.5 dB) turned grass and gravel into the same blobs and the transformer on its latents read 0.75 of the prompts;
    a 2x VAE (16x16x4, 37.8 dB) kept the textures and read 0.93.

    Args:
        resolution (`int`): the training images' side in pixels.
    """
    downsampling = 1
    while downsampling < 4 and resolution // (2 * downsampling) >= 16:
        downsampling *= 2
    return [32, 64, 64][: downsampling.bit_length()]


def check_model_args(args: argparse.Namespace) -> None:
    """The VAE's shape flags: what `AutoencoderKL` would otherwise reject deep in its constructor, or at the first
    decode after the whole data set was opened.

    Args:
        args (`argparse.Namespace`): the flags of [`parse_args`].

    Raises:
        ValueError: naming the flag and its value.
    """
    if args.block_out_channels is None:
        args.block_out_channels = default_block_out_channels(args.resolution)
    channels = args.block_out_channels
    if any(width <= 0 for width in channels):
        raise ValueError(f"--block_out_channels must be positive, got {channels}.")
    # Every ResNet block and the encoder's output normalise their width with GroupNorm(norm_num_groups).
    indivisible = [width for width in channels if width % args.norm_num_groups]
    if indivisible:
        raise ValueError(
            f"--norm_num_groups={args.norm_num_groups} does not divide --block_out_channels {indivisible} "
            f"(of {channels}): pick a common divisor."
        )
    downsampling = 2 ** (len(channels) - 1)
    if args.resolution % downsampling:
        raise ValueError(
            f"--resolution={args.resolution} is not a multiple of the downsampling {downsampling} "
            f"(2^(len(--block_out_channels) - 1) with {len(channels)} blocks)."
        )


# ------------------------------------------------------------------------------------------------------- data
def pixel_transform(
    batch: dict, image_size: int, center_crop: bool = True, random_flip: bool = False, strict: bool = False
) -> dict:
    """The `datasets` transform: decode, resize and normalise one batch of rows when it is read.

    Every row gives an output row, so that `Dataset.__getitems__` stays aligned; an unreadable image (skipped and
    logged by `decode_rows`) gives zeros with `valid=False`, dropped by [`collate_pixels`].

    Args:
        batch (`dict`): `image` cells (undecoded) and their data set `row` numbers.
        image_size (`int`): output side.
        center_crop (`bool`): keep the aspect ratio and center-crop (else stretch).
        random_flip (`bool`): mirror each image with probability 1/2.
        strict (`bool`): raise `CorruptImageError` on an unreadable image instead of skipping it.

    Returns:
        `pixel_values` `(n, 3, S, S)` in [-1, 1], `valid` `(n,)` bool and `row` `(n,)` long.
    """
    images, valid = [], []
    for cell, row in zip(batch["image"], batch["row"]):
        # One cell at a time, so that the message names the row even when the sampler shuffled them.
        decoded, _, skipped = decode_rows([cell], [""], row, strict)
        images += decoded
        valid.append(not skipped)
    valid = torch.tensor(valid, dtype=torch.bool)
    pixel_values = torch.zeros(len(valid), 3, image_size, image_size)
    if images:
        decoded_values = images_to_pixel_values(images, image_size, "crop" if center_crop else "default")
        if random_flip:
            flip = torch.rand(len(decoded_values)) < 0.5
            decoded_values[flip] = decoded_values[flip].flip(-1)
        pixel_values[valid] = decoded_values
    return {"pixel_values": pixel_values, "valid": valid, "row": torch.tensor(batch["row"], dtype=torch.long)}


def collate_pixels(examples: list[dict]) -> dict:
    """Stack the readable rows of a batch.

    Args:
        examples (`list[dict]`): rows of [`pixel_transform`].

    Returns:
        `pixel_values` `(k, 3, S, S)`, `num_images` (k) and `skipped_rows` (the unreadable rows). A batch with no
        readable image holds one zero image and `num_images=0`: the step still runs, at zero loss, so that every
        process calls the model as often (DDP synchronises in `forward`/`backward`).
    """
    kept = [example["pixel_values"] for example in examples if example["valid"]]
    skipped = [int(example["row"]) for example in examples if not example["valid"]]
    pixel_values = torch.stack(kept) if kept else torch.zeros_like(examples[0]["pixel_values"])[None]
    return {
        "pixel_values": pixel_values,
        "num_images": torch.tensor(len(kept)),
        "skipped_rows": torch.tensor(skipped, dtype=torch.long),
    }


def lazy_pixels(dataset: datasets.Dataset, args: argparse.Namespace, random_flip: bool) -> datasets.Dataset:
    """The rows with [`pixel_transform`] set: reading them decodes them, nothing is decoded now.

    Args:
        dataset (`datasets.Dataset`): `image` (undecoded) and `row` columns.
        args (`argparse.Namespace`): `--resolution`, `--center_crop`, `--strict_data`.
        random_flip (`bool`): mirror at random (training rows only).
    """
    transform = partial(
        pixel_transform,
        image_size=args.resolution,
        center_crop=args.center_crop,
        random_flip=random_flip,
        strict=args.strict_data,
    )
    return dataset.with_transform(transform, columns=["image", "row"])


def iter_pixel_batches(dataset: datasets.Dataset, batch_size: int) -> Iterator[tuple[torch.Tensor, list[int]]]:
    """Read a lazy data set of [`lazy_pixels`] in order, one batch in memory at a time.

    Args:
        dataset (`datasets.Dataset`): with [`pixel_transform`] set.
        batch_size (`int`): rows per read.

    Yields:
        The readable pixel values `(k, 3, S, S)` of each batch and the rows of its unreadable images.
    """
    for start in range(0, len(dataset), batch_size):
        batch = dataset[start : start + batch_size]
        yield batch["pixel_values"][batch["valid"]], batch["row"][~batch["valid"]].tolist()


class VAEData(NamedTuple):
    """The data of a run. `train`: the lazy training rows (random flip with `--random_flip`); `statistics`: the lazy
    rows whose latents set the scaling (no flip); `eval_pixels`: the held-out images in memory `(n, 3, S, S)`;
    `held_out`: whether they are held out (else they are the first training rows); `eval_skipped`: their unreadable
    rows."""

    train: datasets.Dataset
    statistics: datasets.Dataset
    eval_pixels: torch.Tensor
    held_out: bool
    eval_skipped: list[int]


def prepare_data(args: argparse.Namespace, accelerator: Accelerator) -> VAEData:
    """Open the data set (on disk, memory-mapped) and split it: the first `--num_eval_images` rows (at most a fifth)
    are held out and decoded now; the rest are read lazily by the training loop.

    Args:
        args (`argparse.Namespace`): the data flags.
        accelerator (`Accelerator`): for the messages.

    Raises:
        ValueError: an empty data set, or no readable held-out image.
    """
    dataset = load_dataset_from_args(args)
    if not len(dataset):
        raise ValueError("The data set has no rows.")
    # Row numbers name an unreadable file in the log and count each one once, however many epochs meet it. The
    # column joins the table without rewriting it: `--max_train_samples` selects a contiguous range, which `datasets`
    # slices instead of building an indices mapping (that `add_column` would flatten into a copy of the data).
    dataset = dataset.add_column("row", np.arange(len(dataset), dtype=np.int64))
    num_eval = min(args.num_eval_images, len(dataset) // 5)  # never more than a fifth of the data
    train_rows = dataset.select(range(num_eval, len(dataset)))
    eval_rows = dataset.select(range(num_eval or min(NUM_FALLBACK_EVAL_ROWS, len(dataset))))
    chunks, eval_skipped = [], []
    for pixel_values, skipped in iter_pixel_batches(lazy_pixels(eval_rows, args, False), args.train_batch_size):
        chunks.append(pixel_values)
        eval_skipped += skipped
    eval_pixels = torch.cat(chunks)
    if not len(eval_pixels):
        raise ValueError(f"No readable image in the first {len(eval_rows)} rows of the data set.")
    # A seeded random sample: the first rows of a folder sorted by name may all be one class.
    sample = np.random.default_rng(args.seed).permutation(len(train_rows))[: args.num_statistics_images]
    statistics = lazy_pixels(train_rows.select(np.sort(sample)), args, False)
    accelerator.print(
        f"Data: {len(train_rows)} training rows read lazily, a batch at a time; {len(eval_pixels)} "
        f"{'held-out' if num_eval else 'training'} images for evaluation ({len(eval_skipped)} unreadable images "
        f"skipped) from {len(eval_rows)} rows; latent statistics on {len(statistics)} training rows."
    )
    return VAEData(
        lazy_pixels(train_rows, args, args.random_flip), statistics, eval_pixels, bool(num_eval), eval_skipped
    )


def build_dataloader(args: argparse.Namespace, train: datasets.Dataset) -> torch.utils.data.DataLoader:
    """A shuffling loader over the lazy training rows: each batch is decoded when drawn (by `__getitems__`, one
    transform call per batch), in `--dataloader_num_workers` worker processes or in this one.

    Args:
        args (`argparse.Namespace`): `--train_batch_size`, `--dataloader_num_workers`.
        train (`datasets.Dataset`): the training rows of [`prepare_data`].
    """
    return torch.utils.data.DataLoader(
        train,
        batch_size=args.train_batch_size,
        shuffle=True,
        drop_last=False,
        collate_fn=collate_pixels,
        num_workers=args.dataloader_num_workers,
    )


# ------------------------------------------------------------------------------------------------------ model
def build_vae(args: argparse.Namespace) -> AutoencoderKL:
    """A randomly initialised `AutoencoderKL` of the model flags.

    Args:
        args (`argparse.Namespace`): `--block_out_channels`, `--layers_per_block`, `--latent_channels`,
            `--norm_num_groups`, `--resolution`.
    """
    blocks = len(args.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=tuple(args.block_out_channels),
        layers_per_block=args.layers_per_block,
        latent_channels=args.latent_channels,
        norm_num_groups=args.norm_num_groups,
        sample_size=args.resolution,
    )


class VAELoss(torch.nn.Module):
    """The VAE and its training loss in one forward, so that DDP (which syncs gradients through `forward`) and FSDP
    wrap a single module.

    Args:
        vae (`AutoencoderKL`): the model trained.
        reconstruction_loss (`str`): `"l1"` or `"mse"`.
        kl_weight (`float`): weight of the KL term.

    Returns:
        `(loss, reconstruction_loss, kl)`: the KL term is per latent element (diffusers' `kl()` sums over C, H, W).
    """

    def __init__(self, vae: AutoencoderKL, reconstruction_loss: str, kl_weight: float):
        super().__init__()
        self.vae = vae
        self.reconstruction_loss = F.l1_loss if reconstruction_loss == "l1" else F.mse_loss
        self.kl_weight = kl_weight

    def forward(
        self, pixel_values: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(pixel_values).latent_dist
        latents = posterior.sample(generator=generator)
        reconstruction = self.vae.decode(latents).sample
        reconstruction_loss = self.reconstruction_loss(reconstruction.float(), pixel_values.float())
        kl = posterior.kl().mean() / latents[0].numel()
        return reconstruction_loss + self.kl_weight * kl, reconstruction_loss.detach(), kl.detach()


@torch.no_grad()
def latent_statistics(vae: AutoencoderKL, statistics: datasets.Dataset, batch_size: int) -> tuple[float, float]:
    """Mean and standard deviation of the posterior means (what train_transfusion.py encodes) over all elements,
    accumulated batch by batch (float64 sums), so that only one batch of images and latents is in memory.

    Args:
        vae (`AutoencoderKL`): the trained VAE.
        statistics (`datasets.Dataset`): lazy rows of [`lazy_pixels`].
        batch_size (`int`): images per VAE call.

    Raises:
        ValueError: no readable image among the rows.
    """
    count, total, total_squares = 0, 0.0, 0.0
    for pixel_values, _ in iter_pixel_batches(statistics, batch_size):
        if not len(pixel_values):
            continue
        latents = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist.mode().double()
        count, total, total_squares = (
            count + latents.numel(),
            total + latents.sum(),
            total_squares + latents.square().sum(),
        )
    if count < 2:
        raise ValueError(f"No readable image among the {len(statistics)} rows of the latent statistics.")
    mean = total / count
    # Unbiased, as `torch.std` (which the scaling factor was computed with before).
    variance = (total_squares - count * mean**2) / (count - 1)
    return float(mean), float(max(variance, 0.0) ** 0.5)


@torch.no_grad()
def evaluate(vae: AutoencoderKL, pixels: torch.Tensor, batch_size: int) -> tuple[dict, torch.Tensor]:
    """Reconstruction error of the posterior means (deterministic), pixel values in [-1, 1].

    Args:
        vae (`AutoencoderKL`): the trained VAE.
        pixels (`torch.Tensor`): the held-out images `(n, 3, S, S)`.
        batch_size (`int`): images per VAE call.

    Returns:
        The metrics (`reconstruction_l1`, `reconstruction_mse`, `psnr`) and the reconstructions.
    """
    outputs = []
    for start in range(0, len(pixels), batch_size):
        batch = pixels[start : start + batch_size].to(vae.device, vae.dtype)
        outputs.append(vae.decode(vae.encode(batch).latent_dist.mode()).sample.float().cpu().clamp(-1, 1))
    reconstructions = torch.cat(outputs)
    mse = F.mse_loss(reconstructions, pixels).item()
    # PSNR on [0, 1] images: the [-1, 1] range doubles the error, so the MSE shrinks by 4.
    psnr = 10 * torch.log10(torch.tensor(1.0 / max(mse / 4, 1e-12))).item()
    return {"reconstruction_l1": F.l1_loss(reconstructions, pixels).item(), "reconstruction_mse": mse, "psnr": psnr}, (
        reconstructions
    )


def to_pil(pixel_values: torch.Tensor):
    """One image `(3, S, S)` in [-1, 1] as a `PIL.Image.Image`.

    Args:
        pixel_values (`torch.Tensor`): the image.
    """
    import PIL.Image

    array = ((pixel_values.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return PIL.Image.fromarray(array)


# --------------------------------------------------------------------------------------------------- training
def setup_accelerator(args: argparse.Namespace) -> Accelerator:
    """The `Accelerator` of the run (seeded; `logs/` created under `--output_dir`).

    Args:
        args (`argparse.Namespace`): the run flags.
    """
    accelerator = build_accelerator(args)
    set_seed(args.seed)
    (Path(args.output_dir) / "logs").mkdir(parents=True, exist_ok=True)
    accelerator.print(f"Distributed: num_processes={accelerator.num_processes} ({accelerator.distributed_type}).")
    return accelerator


def build_optimizer(
    args: argparse.Namespace, model: torch.nn.Module, num_processes: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW and a cosine schedule with warmup down to `--min_lr_ratio`.

    Args:
        args (`argparse.Namespace`): the optimisation flags.
        model (`torch.nn.Module`): the module trained.
        num_processes (`int`): the prepared scheduler steps once per process at each step.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    lr_scheduler = get_cosine_with_min_lr_schedule_with_warmup_lr_rate(
        optimizer,
        num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=args.max_train_steps * num_processes,
        min_lr_rate=args.min_lr_ratio,
    )
    return optimizer, lr_scheduler


def count_skipped(accelerator: Accelerator, skipped_rows: set[int]) -> int:
    """The unreadable training rows met so far by all processes, each counted once (all processes call this together).

    Args:
        accelerator (`Accelerator`): the run's.
        skipped_rows (`set[int]`): this process's.
    """
    if accelerator.num_processes == 1:
        return len(skipped_rows)
    return len(set(gather_object(sorted(skipped_rows))))


def train_step(
    args: argparse.Namespace,
    accelerator: Accelerator,
    model,
    optimizer,
    lr_scheduler,
    batch: dict,
    step: int,
    generator,
) -> tuple[torch.Tensor, dict]:
    """One forward and backward (an optimiser step when the accumulation window closes).

    Args:
        args (`argparse.Namespace`): `--max_grad_norm`.
        accelerator (`Accelerator`), model, optimizer, lr_scheduler: the prepared objects.
        batch (`dict`): from [`collate_pixels`].
        step (`int`): the step this batch counts towards, for the message of a non-finite loss.
        generator (`torch.Generator`): samples the posterior.

    Returns:
        The loss and its parts (`reconstruction_loss`, `kl`).

    Raises:
        ValueError: a non-finite loss.
    """
    with accelerator.accumulate(model):
        loss, reconstruction_loss, kl = model(batch["pixel_values"], generator)
        parts = {"reconstruction_loss": reconstruction_loss.item(), "kl": kl.item()}
        if not torch.isfinite(loss):
            raise ValueError(f"The VAE loss is {loss.item()} at step {step}: lower the learning rate.")
        if not batch["num_images"]:
            loss = loss * 0.0  # a batch of unreadable images only: a no-op step keeps the processes in step
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return loss, parts


def log_step(args: argparse.Namespace, accelerator: Accelerator, record: dict, skipped_rows: set[int]) -> None:
    """Add the skipped-image count to a log record, send it to the trackers and append it to `train_log.jsonl`.

    Args:
        args (`argparse.Namespace`): `--output_dir`.
        accelerator (`Accelerator`): the run's (all processes call this together).
        record (`dict`): step, losses, learning rate, throughput.
        skipped_rows (`set[int]`): this process's unreadable training rows so far.
    """
    record["skipped_images"] = count_skipped(accelerator, skipped_rows)
    accelerator.log(record, step=record["step"])
    if accelerator.is_main_process:
        with (Path(args.output_dir) / "logs" / "train_log.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def training_loop(
    args: argparse.Namespace, accelerator: Accelerator, model, optimizer, lr_scheduler, dataloader
) -> tuple[int, int]:
    """Train for `--max_train_steps` optimiser steps over as many epochs as that takes.

    Args:
        args (`argparse.Namespace`): the run flags.
        accelerator (`Accelerator`), model, optimizer, lr_scheduler, dataloader: the prepared objects.

    Returns:
        The last step and the number of unreadable training images met (each counted once).

    Raises:
        ValueError: an epoch without a single readable image on this process.
    """
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed * 1000 + accelerator.process_index)
    progress = tqdm(total=args.max_train_steps, disable=not accelerator.is_local_main_process, desc="training vae")
    global_step, epoch, window_images, window_start, skipped_rows = 0, 0, 0, time.time(), set()
    model.train()
    while global_step < args.max_train_steps:
        dataloader.set_epoch(epoch)
        epoch_images = 0
        for batch in dataloader:
            loss, parts = train_step(
                args, accelerator, model, optimizer, lr_scheduler, batch, global_step + 1, generator
            )
            skipped_rows.update(batch["skipped_rows"].tolist())
            epoch_images += int(batch["num_images"])
            window_images += int(batch["num_images"]) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress.update(1)
            progress.set_postfix({key: f"{value:.4f}" for key, value in parts.items()})
            if global_step % args.logging_steps == 0 or global_step == args.max_train_steps:
                rate = window_images / max(time.time() - window_start, 1e-9)
                record = {"step": global_step, "loss": loss.item(), **parts, "lr": lr_scheduler.get_last_lr()[0]}
                log_step(args, accelerator, {**record, "images_per_second": rate}, skipped_rows)
                window_images, window_start = 0, time.time()
            if global_step >= args.max_train_steps:
                break
        if not epoch_images and global_step < args.max_train_steps:
            raise ValueError(f"No readable training image in epoch {epoch} ({len(skipped_rows)} unreadable rows).")
        epoch += 1
    progress.close()
    return global_step, count_skipped(accelerator, skipped_rows)


def save_results(
    args: argparse.Namespace, accelerator: Accelerator, model, data: VAEData, global_step: int, skipped: int
) -> None:
    """Set the latent scaling, save the VAE, its metrics and the reconstruction grid (main process only).

    Args:
        args (`argparse.Namespace`): `--output_dir`, `--train_batch_size`.
        accelerator (`Accelerator`), model: the prepared objects.
        data (`VAEData`): the evaluation images and the statistics rows.
        global_step (`int`): the last step.
        skipped (`int`): unreadable training images met.
    """
    output_dir = Path(args.output_dir)
    vae = accelerator.unwrap_model(model).vae.eval()
    mean, std = latent_statistics(vae, data.statistics, args.train_batch_size)
    # The latent scaling train_transfusion.py and the pipeline apply: (z - shift_factor) * scaling_factor.
    vae.register_to_config(scaling_factor=1.0 / max(std, 1e-6), shift_factor=mean)
    vae.save_pretrained(output_dir)
    metrics, reconstructions = evaluate(vae, data.eval_pixels, args.train_batch_size)
    metrics.update(
        {
            "num_eval_images": len(data.eval_pixels),
            "held_out": data.held_out,
            "latent_mean": mean,
            "latent_std": std,
            "scaling_factor": vae.config.scaling_factor,
            "shift_factor": vae.config.shift_factor,
            "global_step": global_step,
            # The fallback evaluation rows are training rows: their unreadable ones may already be counted.
            "skipped_images": skipped + (len(data.eval_skipped) if data.held_out else 0),
        }
    )
    (output_dir / "vae_metrics.json").write_text(json.dumps(metrics, indent=2))
    shown = min(8, len(data.eval_pixels))
    grid = make_grid(
        [to_pil(image) for image in data.eval_pixels[:shown]] + [to_pil(image) for image in reconstructions[:shown]],
        ["original"] * shown + ["reconstruction"] * shown,
        columns=max(shown, 1),
        label_lines=1,
    )
    grid.save(output_dir / "reconstructions.png")
    accelerator.print(
        f"Saved the VAE to {output_dir}: held-out L1 {metrics['reconstruction_l1']:.4f}, "
        f"PSNR {metrics['psnr']:.2f} dB, scaling_factor {vae.config.scaling_factor:.4f}, "
        f"shift_factor {vae.config.shift_factor:.4f}; {metrics['skipped_images']} unreadable images skipped."
    )


def main(argv: list[str] | argparse.Namespace | None = None) -> Path:
    """Train, then save the VAE to `--output_dir`; returns that folder.

    Args:
        argv (`list[str]` or `argparse.Namespace`, *optional*): the command line (default `sys.argv`), or flags
            already parsed (checked again).
    """
    args = check_args(argv) if isinstance(argv, argparse.Namespace) else parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    accelerator = setup_accelerator(args)
    data = prepare_data(args, accelerator)
    vae = build_vae(args)
    accelerator.print(
        f"VAE: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters, "
        f"{2 ** (len(args.block_out_channels) - 1)}x downsampling, {args.latent_channels} latent channels."
    )
    model = VAELoss(vae, args.reconstruction_loss, args.kl_weight)
    optimizer, lr_scheduler = build_optimizer(args, model, accelerator.num_processes)
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, build_dataloader(args, data.train), lr_scheduler
    )
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers("train_vae", config={k: v for k, v in vars(args).items() if not isinstance(v, list)})
    global_step, skipped = training_loop(args, accelerator, model, optimizer, lr_scheduler, dataloader)
    accelerator.print(f"Trained {global_step} steps on {len(data.train)} rows ({skipped} unreadable images skipped).")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_results(args, accelerator, model, data, global_step, skipped)
    accelerator.end_training()
    return Path(args.output_dir)


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
