#!/usr/bin/env python
"""Train a small diffusers `AutoencoderKL` for Transfusion's latent space, on the same data sources as
examples/train_transfusion.py (the built-in shapes, a local image folder, or a Hub data set).

    accelerate launch examples/train_vae.py --dataset_name shapes --output_dir outputs/vae --max_train_steps 3000
    accelerate launch examples/train_transfusion.py --dataset_name shapes --vae_name_or_path outputs/vae ...

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
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers import AutoencoderKL
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup_lr_rate

from transfusion_hf.data.image_text import add_data_arguments, encode_latents, load_dataset_from_args
from transfusion_hf.visualization import make_grid

logger = logging.getLogger("train_vae")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = add_data_arguments(parser)
    data.add_argument("--num_eval_images", type=int, default=64, help="Held out to measure reconstruction error.")

    model = parser.add_argument_group("model")
    model.add_argument(
        "--block_out_channels",
        type=int,
        nargs="+",
        default=[32, 64, 64],
        help="One encoder/decoder block per entry; the image is downsampled 2^(len - 1) times (4x by default).",
    )
    model.add_argument("--latent_channels", type=int, default=4)
    model.add_argument("--layers_per_block", type=int, default=1)
    model.add_argument("--norm_num_groups", type=int, default=32)

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
    args = parser.parse_args(argv)
    if (args.dataset_name is None) == (args.train_data_dir is None):
        raise ValueError("Give exactly one data source: --dataset_name (or --dataset shapes) or --train_data_dir.")
    for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "resolution"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}.")
    downsampling = 2 ** (len(args.block_out_channels) - 1)
    if args.resolution % downsampling:
        raise ValueError(f"--resolution={args.resolution} is not a multiple of the downsampling {downsampling}.")
    return args


def load_pixels(args: argparse.Namespace, accelerator) -> torch.Tensor:
    """Every readable image of the data set as pixel values `(n, 3, S, S)` in [-1, 1] (corrupt files skipped and
    counted exactly as in train_transfusion.py)."""
    dataset = load_dataset_from_args(args)
    examples, skipped = encode_latents(
        dataset,
        lambda pixel_values: pixel_values,  # identity: keep pixels
        args.resolution,
        args.center_crop,
        args.random_flip,
        strict=args.strict_data,
    )
    accelerator.print(f"Loaded {len(examples)} images ({skipped} unreadable images skipped) from {len(dataset)} rows.")
    if not examples:
        raise ValueError("No readable image in the data set.")
    pixels = [example["latents"] for example in examples]
    pixels += [example["flipped_latents"] for example in examples if "flipped_latents" in example]
    return torch.stack(pixels)


def build_vae(args: argparse.Namespace) -> AutoencoderKL:
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

    Returns:
        `(loss, reconstruction_loss, kl)`: the KL term is per latent element (diffusers' `kl()` sums over C, H, W).
    """

    def __init__(self, vae: AutoencoderKL, reconstruction_loss: str, kl_weight: float):
        super().__init__()
        self.vae = vae
        self.reconstruction_loss = F.l1_loss if reconstruction_loss == "l1" else F.mse_loss
        self.kl_weight = kl_weight

    def forward(self, pixel_values: torch.Tensor, generator: torch.Generator | None = None):
        posterior = self.vae.encode(pixel_values).latent_dist
        latents = posterior.sample(generator=generator)
        reconstruction = self.vae.decode(latents).sample
        reconstruction_loss = self.reconstruction_loss(reconstruction.float(), pixel_values.float())
        kl = posterior.kl().mean() / latents[0].numel()
        return reconstruction_loss + self.kl_weight * kl, reconstruction_loss.detach(), kl.detach()


@torch.no_grad()
def latent_statistics(vae: AutoencoderKL, pixels: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """Mean and standard deviation of the posterior means (what train_transfusion.py encodes) over all elements."""
    latents = torch.cat(
        [
            vae.encode(pixels[start : start + batch_size].to(vae.device, vae.dtype)).latent_dist.mode().float().cpu()
            for start in range(0, len(pixels), batch_size)
        ]
    )
    return latents.mean().item(), latents.std().item()


@torch.no_grad()
def evaluate(vae: AutoencoderKL, pixels: torch.Tensor, batch_size: int) -> tuple[dict, torch.Tensor]:
    """Reconstruction error of the posterior means (deterministic), pixel values in [-1, 1]."""
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
    import PIL.Image

    array = ((pixel_values.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return PIL.Image.fromarray(array)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv) if not isinstance(argv, argparse.Namespace) else argv
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=str(Path(args.output_dir) / "logs")
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    (output_dir / "logs").mkdir(parents=True, exist_ok=True)
    accelerator.print(f"Distributed: num_processes={accelerator.num_processes} ({accelerator.distributed_type}).")

    pixels = load_pixels(args, accelerator)
    num_eval = min(args.num_eval_images, len(pixels) // 5)  # never more than a fifth of the data
    train_pixels, eval_pixels = pixels[num_eval:], pixels[:num_eval] if num_eval else pixels[:8]
    vae = build_vae(args)
    accelerator.print(
        f"VAE: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters, "
        f"{2 ** (len(args.block_out_channels) - 1)}x downsampling, {args.latent_channels} latent channels."
    )
    dataloader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(train_pixels), batch_size=args.train_batch_size, shuffle=True, drop_last=False
    )
    model = VAELoss(vae, args.reconstruction_loss, args.kl_weight)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    lr_scheduler = get_cosine_with_min_lr_schedule_with_warmup_lr_rate(
        optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
        min_lr_rate=args.min_lr_ratio,
    )
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers("train_vae", config={k: v for k, v in vars(args).items() if not isinstance(v, list)})
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed * 1000 + accelerator.process_index)
    log_path = output_dir / "logs" / "train_log.jsonl"
    progress = tqdm(total=args.max_train_steps, disable=not accelerator.is_local_main_process, desc="training vae")
    global_step, epoch, window_images, window_start = 0, 0, 0, time.time()
    model.train()
    while global_step < args.max_train_steps:
        dataloader.set_epoch(epoch)
        for (batch,) in dataloader:
            with accelerator.accumulate(model):
                loss, reconstruction_loss, kl = model(batch, generator)
                parts = {"reconstruction_loss": reconstruction_loss.item(), "kl": kl.item()}
                if not torch.isfinite(loss):
                    raise ValueError(
                        f"The VAE loss is {loss.item()} at step {global_step + 1}: lower the learning rate."
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            window_images += len(batch) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress.update(1)
            progress.set_postfix({key: f"{value:.4f}" for key, value in parts.items()})
            if global_step % args.logging_steps == 0 or global_step == args.max_train_steps:
                record = {
                    "step": global_step,
                    "loss": loss.item(),
                    **parts,
                    "lr": lr_scheduler.get_last_lr()[0],
                    "images_per_second": window_images / max(time.time() - window_start, 1e-9),
                }
                accelerator.log(record, step=global_step)
                if accelerator.is_main_process:
                    with log_path.open("a") as handle:
                        handle.write(json.dumps(record) + "\n")
                window_images, window_start = 0, time.time()
            if global_step >= args.max_train_steps:
                break
        epoch += 1
    progress.close()
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        vae = accelerator.unwrap_model(model).vae.eval()
        mean, std = latent_statistics(vae, train_pixels, args.train_batch_size)
        # The latent scaling train_transfusion.py and the pipeline apply: (z - shift_factor) * scaling_factor.
        vae.register_to_config(scaling_factor=1.0 / max(std, 1e-6), shift_factor=mean)
        vae.save_pretrained(output_dir)
        metrics, reconstructions = evaluate(vae, eval_pixels, args.train_batch_size)
        metrics.update(
            {
                "num_eval_images": len(eval_pixels),
                "held_out": bool(num_eval),
                "latent_mean": mean,
                "latent_std": std,
                "scaling_factor": vae.config.scaling_factor,
                "shift_factor": vae.config.shift_factor,
                "global_step": global_step,
            }
        )
        (output_dir / "vae_metrics.json").write_text(json.dumps(metrics, indent=2))
        shown = min(8, len(eval_pixels))
        grid = make_grid(
            [to_pil(image) for image in eval_pixels[:shown]] + [to_pil(image) for image in reconstructions[:shown]],
            ["original"] * shown + ["reconstruction"] * shown,
            columns=max(shown, 1),
            label_lines=1,
        )
        grid.save(output_dir / "reconstructions.png")
        accelerator.print(
            f"Saved the VAE to {output_dir}: held-out L1 {metrics['reconstruction_l1']:.4f}, "
            f"PSNR {metrics['psnr']:.2f} dB, scaling_factor {vae.config.scaling_factor:.4f}, "
            f"shift_factor {vae.config.shift_factor:.4f}."
        )
    accelerator.end_training()
    return output_dir


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
