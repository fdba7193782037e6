"""What a run shows while it trains: sample grids, captions, the text-conditioning gap and the held-out text loss."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import PIL.Image
import torch
from accelerate import Accelerator

from ..evaluation.field_metrics import DESCRIPTIONS, cached_field_metrics, evaluate_pipeline, parse_metric_names
from ..image_grids import stack_if_same_grid
from ..modeling_transfusion import TransfusionForMixedModal, TransfusionOutput
from ..pipeline_transfusion import TransfusionPipeline
from ..visualization import make_grid
from .compilation import mark_varying_dims_dynamic
from .components import TrainingComponents
from .conditioning import text_conditioning_gap

logger = logging.getLogger("transfusion_hf.training")


# Pairs of the data on which validation measures the text-conditioning gap (kept in memory with the validation ones).
CONDITIONING_GAP_PAIRS = 64
# Steps between validations when `--validation_steps` is not given (0 under FSDP, which cannot sample sharded).
DEFAULT_VALIDATION_STEPS = 250
# Validation examples on which `--validation_metrics` are measured when `--num_validation_metric_samples` is not given.
DEFAULT_VALIDATION_METRIC_SAMPLES = 24


def training_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> TransfusionOutput:
    """The training forward: no KV cache (the backbone would otherwise build one at every step, for nothing). The
    numbers of rows and images are marked dynamic, so that a `--torch_compile` run compiles one graph for all batches
    (a hint that eager mode ignores)."""
    return model(**mark_varying_dims_dynamic(batch), use_cache=False)


def make_pipeline(model: TransfusionForMixedModal, components: TrainingComponents) -> TransfusionPipeline:
    """The run's pipeline around `model` (unwrapped): its sampler, VAE and tokenizer."""
    return TransfusionPipeline(
        transformer=model,
        scheduler=components.inference_scheduler,
        vae=components.vae,
        tokenizer=components.tokenizer,
    )


@torch.no_grad()
def run_validation(
    args: argparse.Namespace,
    accelerator: Accelerator,
    model: torch.nn.Module,
    components: TrainingComponents,
    examples: list[dict],
    step: int,
) -> None:
    """Images for the validation prompts and captions for a few training images, as a PNG grid and in the trackers."""
    # Sampling runs the model uncompiled (`--torch_compile` compiles the training step only): its cached calls would
    # otherwise recompile at every new shape.
    pipeline = make_pipeline(accelerator.unwrap_model(model, keep_torch_compile=False), components)
    pipeline.set_progress_bar_config(disable=True)
    if examples and examples[0].get("source_latents") is not None:
        # An editing run: its rows are (source, instruction, target); text-to-image and the caption gap say nothing
        # about them, the edits of a few training sources do.
        save_validation_grid(args, accelerator, *edit_validation_grid(args, model, pipeline, examples), step)
        return
    prompts = args.validation_prompts or [example["text"] for example in examples[:4]]
    generator = torch.Generator().manual_seed(args.seed)
    was_training = model.training
    model.eval()
    images = pipeline(
        prompts, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, generator=generator
    ).images
    reference = [
        pipeline.decode_latents(example["latents"][None].to(pipeline.transformer.dtype))[0]
        for example in examples[: args.num_validation_captions]
    ]
    # Each image read at its own size (aspect-ratio buckets), in pixels: its latents' size times the VAE's scale.
    sizes = [
        tuple(side * pipeline.vae_scale_factor for side in example["latents"].shape[-2:])
        for example in examples[: len(reference)]
    ]
    if len(set(sizes)) <= 1:
        captions = (
            pipeline.caption(reference, max_new_tokens=24, height=sizes[0][0], width=sizes[0][1]) if sizes else []
        )
    else:
        captions = [
            pipeline.caption([image], max_new_tokens=24, height=height, width=width)[0]
            for image, (height, width) in zip(reference, sizes)
        ]
    model.train(was_training)
    log_text_conditioning_gap(args, accelerator, pipeline.transformer, components, examples, step)
    log_field_metrics(args, accelerator, pipeline, examples, step)
    grid = make_grid(images + reference, [f"prompt: {p}" for p in prompts] + [f"caption: {c}" for c in captions])
    save_validation_grid(args, accelerator, grid, captions, step)


def edit_validation_grid(
    args: argparse.Namespace,
    model: torch.nn.Module,
    pipeline: TransfusionPipeline,
    examples: list[dict],
) -> tuple[PIL.Image.Image, list[str]]:
    """The first four training sources, each followed by its edit (`pipeline.edit` with its instruction) and the
    target it was trained towards; returns the grid and the instructions."""
    chosen = examples[:4]
    was_training = model.training
    model.eval()

    def decode(column: str) -> list[PIL.Image.Image]:
        latents = torch.stack([torch.as_tensor(example[column]) for example in chosen])
        return pipeline.decode_latents(latents.to(pipeline.device, pipeline.transformer.dtype))

    sources, targets = decode("source_latents"), decode("latents")
    instructions = [example["text"] for example in chosen]
    generator = torch.Generator().manual_seed(args.seed)
    edited = pipeline.edit(
        sources,
        instructions,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        generator=generator,
    ).images
    model.train(was_training)
    images = [image for triple in zip(sources, edited, targets) for image in triple]
    labels = [label for text in instructions for label in ("source", f"edit: {text}", "target")]
    return make_grid(images, labels, columns=6), instructions


def save_validation_grid(
    args: argparse.Namespace, accelerator: Accelerator, grid: PIL.Image.Image, texts: list[str], step: int
) -> None:
    """Write the validation grid to `output_dir/validation/step-N.png` and to tensorboard, with its texts."""
    folder = Path(args.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    grid.save(folder / f"step-{step:06d}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
            tracker.writer.add_text("validation/captions", "\n".join(texts), step)


def log_text_conditioning_gap(
    args: argparse.Namespace,
    accelerator: Accelerator,
    model: TransfusionForMixedModal,
    components: TrainingComponents,
    examples: list[dict],
    step: int,
) -> None:
    """Measure the text-conditioning gap on the validation examples (up to `CONDITIONING_GAP_PAIRS`, spread over the
    data set; the same noise and times at every validation) and log it: trackers, `logs/validation_log.jsonl` and one
    console line."""
    pairs = [example for example in examples[:CONDITIONING_GAP_PAIRS] if example.get("latents") is not None]
    captions = [example["text"] for example in pairs]
    if len(set(captions)) < 2:
        if not components.gap_skip_warned:
            logger.warning("Every validation pair has the same caption: the text-conditioning gap is not measured.")
            components.gap_skip_warned = True
        return
    clean = stack_if_same_grid([torch.as_tensor(example["latents"]) for example in pairs])
    gap = text_conditioning_gap(model, components.processor, components.noiser, captions, clean, seed=args.seed)
    record = gap.log_record()
    accelerator.log(record, step=step)
    with (Path(args.output_dir) / "logs" / "validation_log.jsonl").open("a") as handle:
        handle.write(json.dumps({"step": step, **record}) + "\n")
    bands = ", ".join(f"{band} {value:+.3f}" for band, value in gap.relative_gap.items())
    accelerator.print(
        f"step {step}: text-conditioning gap (diffusion loss with another pair's caption / with its own - 1; ~0 while "
        f"the model ignores the prompt): {bands}"
    )


def check_validation_metrics(args: argparse.Namespace) -> None:
    """Check `--validation_metrics` and load the models they need (`--fid_feature_extractor`, `--clip_model`) before
    any data is loaded: a missing weight fails here with one line naming the flag to pass instead."""
    if not args.validation_metrics:
        return
    if args.validation_steps == 0:
        raise ValueError(
            f"--validation_metrics={args.validation_metrics!r} needs validation: --validation_steps is 0."
        )
    if getattr(args, "aspect_ratio_buckets", None):
        # FID / KID compare one image size, and the captions are read at the default size: not yet per bucket.
        raise ValueError(
            f"--validation_metrics={args.validation_metrics!r} is measured at one image size, but "
            f"--aspect_ratio_buckets={args.aspect_ratio_buckets!r} trains several: evaluate the saved pipeline at each "
            "size instead (examples/shapes_demo.py scores every bucket)."
        )
    if not 2 <= args.num_validation_metric_samples <= CONDITIONING_GAP_PAIRS:
        raise ValueError(
            f"--num_validation_metric_samples must be in [2, {CONDITIONING_GAP_PAIRS}] (the validation examples kept "
            f"in memory), got {args.num_validation_metric_samples}."
        )
    names = parse_metric_names(args.validation_metrics, "--validation_metrics")
    cached_field_metrics(names, args.fid_feature_extractor, args.clip_model)


@torch.no_grad()
def log_field_metrics(
    args: argparse.Namespace, accelerator: Accelerator, pipeline: TransfusionPipeline, examples: list[dict], step: int
) -> None:
    """Measure `--validation_metrics` (FID, KID, CLIP score, caption BLEU / CIDEr, perplexity) on the first
    `--num_validation_metric_samples` validation examples (spread over the training data; the same ones, noise and
    seed at every validation) and log them as `eval/<name>`: trackers, `logs/validation_log.jsonl`, one console line.
    """
    if not getattr(args, "validation_metrics", None):
        return
    names = parse_metric_names(args.validation_metrics, "--validation_metrics")
    field_metrics = cached_field_metrics(names, args.fid_feature_extractor, args.clip_model)
    chosen = [
        example for example in examples[: args.num_validation_metric_samples] if example.get("latents") is not None
    ]
    if len(chosen) < 2:
        return
    model = pipeline.transformer
    was_training = model.training
    model.eval()
    latents = torch.stack([torch.as_tensor(example["latents"]) for example in chosen]).to(model.dtype)
    references = pipeline.decode_latents(latents.to(model.device))
    evaluation = evaluate_pipeline(
        pipeline,
        [example["text"] for example in chosen],
        references,
        field_metrics,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        batch_size=len(chosen),
        max_new_tokens=24,
        seed=args.seed,
    )
    model.train(was_training)
    record = {f"eval/{name}": value for name, value in evaluation.metrics.items() if name in DESCRIPTIONS}
    record["eval/field_metrics_seconds"] = evaluation.metrics["seconds"]
    accelerator.log(record, step=step)
    with (Path(args.output_dir) / "logs" / "validation_log.jsonl").open("a") as handle:
        handle.write(json.dumps({"step": step, **record}) + "\n")
    scores = ", ".join(f"{name.removeprefix('eval/')} {value:.4g}" for name, value in record.items())
    accelerator.print(f"step {step}: field metrics on {len(chosen)} validation examples: {scores}")


@torch.no_grad()
def text_lm_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], accelerator: Accelerator) -> float:
    """The LM loss of the held-out text rows: the mean over their predicted tokens (every batch weighted by its
    tokens), with the training weights, in eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = {key: value.to(accelerator.device) for key, value in batch.items()}
        predicted = int((batch["labels"][:, 1:] != -100).sum())
        total += float(training_forward(model, batch).lm_loss) * predicted
        count += predicted
    model.train(was_training)
    return total / max(count, 1)
