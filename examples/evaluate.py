#!/usr/bin/env python
"""Evaluate a saved TransfusionPipeline like the field: FID and KID of generated vs held-out real images, CLIP score of
the generated images against their prompts, caption BLEU-1..4 and CIDEr against the references, and the LM's perplexity
on the held-out captions; on any captioned data set the training script reads (Hub, image folder, webdataset shards,
the built-in shapes or glyphs; with `--interleaved`, documents of several texts and images, each image captioned by the
text before it).

    python examples/evaluate.py --pretrained_model_name_or_path outputs/shapes --dataset shapes \
        --dataset_split held_out --fid_feature_extractor shapes --metrics fid,kid,caption,perplexity \
        --output_dir outputs/shapes/field_metrics

`--num_samples` rows, spread evenly over the split (a folder sorted by class gives every class), are the real images
and their captions: one image is generated per caption, one caption per image. The scores come from maintained
libraries (`transfusion_hf.evaluation.field_metrics`: torchmetrics, pycocoevalcap). By default FID / KID use
torchmetrics' standard InceptionV3 and the CLIP score `openai/clip-vit-base-patch32`, both downloads: offline, pass
`--fid_feature_extractor shapes` (a CNN trained here on the built-in shapes) or a `.pt2` feature extractor of your own,
and `--clip_model` a local CLIP folder, or leave `clip` out of `--metrics`. Writes to --output_dir: `metrics.json`,
`metrics.md` (a markdown table), `samples.png` (generated images under their prompts, then real images under their
generated captions) and `captions.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import PIL.Image
import torch

from transfusion_hf.data.image_text import (
    add_data_arguments,
    check_dataset_from_args,
    decode_rows,
    load_dataset_from_args,
    spread_rows,
)
from transfusion_hf.data.interleaved import captioned_images
from transfusion_hf.evaluation.feature_extractors import STANDARD_FEATURE_EXTRACTOR
from transfusion_hf.evaluation.field_metrics import (
    DEFAULT_CLIP_MODEL,
    FIELD_METRICS,
    FieldEvaluation,
    FieldMetrics,
    evaluate_pipeline,
    metrics_table,
    parse_metric_names,
)
from transfusion_hf.pipeline_transfusion import TransfusionPipeline
from transfusion_hf.processing_transfusion import images_to_pixel_values
from transfusion_hf.visualization import make_grid


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags: the training script's data flags, the pipeline, the metrics and their models, sampling."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--pretrained_model_name_or_path", "--pipeline", required=True, help="A saved TransfusionPipeline."
    )
    add_data_arguments(parser)
    parser.add_argument(
        "--interleaved",
        action="store_true",
        help="The data set holds interleaved documents (as the training script's --interleaved reads them): each "
        "image with the text just before it is a captioned image; images with no text before them are left out.",
    )
    # The images are made at the pipeline's size; --resolution may only repeat it.
    parser.set_defaults(resolution=None)
    metrics = parser.add_argument_group("metrics")
    metrics.add_argument(
        "--metrics", default=",".join(FIELD_METRICS), help=f"Comma list of {', '.join(FIELD_METRICS)} (default all)."
    )
    metrics.add_argument(
        "--fid_feature_extractor",
        default=STANDARD_FEATURE_EXTRACTOR,
        help="Features of FID / KID: 'inception' (torchmetrics' standard, a download), 'shapes' (a CNN trained here "
        "on the built-in shapes) or a .pt2 file (transfusion_hf.evaluation.save_feature_extractor).",
    )
    metrics.add_argument(
        "--clip_model", default=DEFAULT_CLIP_MODEL, help="CLIP of the CLIP score: a Hub id or a local folder."
    )
    metrics.add_argument(
        "--num_samples",
        type=int,
        default=256,
        help="Rows evaluated, spread over the split (with --interleaved: captioned images, one per document in turn).",
    )
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--num_inference_steps", type=int, default=25)
    sampling.add_argument("--guidance_scale", type=float, default=3.0)
    sampling.add_argument("--batch_size", type=int, default=32, help="Prompts or images per pipeline call.")
    sampling.add_argument("--max_new_tokens", type=int, default=32, help="Longest generated caption, in tokens.")
    sampling.add_argument("--seed", type=int, default=0)
    sampling.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output_dir", default="outputs/evaluation")
    return check_args(parser.parse_args(argv))


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """Every check that needs no model and no data; raises `ValueError` naming the flag and its value."""
    if sum(source is not None for source in (args.dataset_name, args.train_data_dir, args.train_data_files)) != 1:
        raise ValueError(
            "Give exactly one data source: --dataset_name (or --dataset shapes), --train_data_dir or "
            "--train_data_files."
        )
    args.metrics = parse_metric_names(args.metrics, "--metrics")
    if not args.metrics:
        raise ValueError(f"--metrics is empty; choose from {list(FIELD_METRICS)}.")
    minimum = 2 if {"fid", "kid"} & set(args.metrics) else 1
    if args.num_samples < minimum:
        raise ValueError(f"--num_samples must be >= {minimum} (FID and KID need two images), got {args.num_samples}.")
    for name in ("num_inference_steps", "batch_size", "max_new_tokens"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}.")
    if args.guidance_scale < 0:
        raise ValueError(f"--guidance_scale must be >= 0, got {args.guidance_scale}.")
    check_dataset_from_args(args)
    return args


def load_pipeline(args: argparse.Namespace) -> TransfusionPipeline:
    """The pipeline, on `--device`, progress bar off; `--resolution` must be its image size when given."""
    try:
        pipeline = TransfusionPipeline.from_pretrained(args.pretrained_model_name_or_path)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"--pretrained_model_name_or_path={args.pretrained_model_name_or_path!r} cannot be loaded: {reason}"
        ) from error
    if args.resolution is not None and args.resolution != pipeline.image_size:
        raise ValueError(
            f"--resolution={args.resolution} differs from the pipeline's image size {pipeline.image_size}: the real "
            "images are compared at the size the pipeline makes (leave --resolution out)."
        )
    args.resolution = pipeline.image_size  # the built-in glyphs render at this size
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(args.device)


def load_real_images(args: argparse.Namespace, image_size: int) -> tuple[list[PIL.Image.Image], list[str]]:
    """`--num_samples` rows spread evenly over the split, decoded (unreadable ones skipped) and resized (center crop
    with `--center_crop`) to the pipeline's size; their captions."""
    dataset = load_dataset_from_args(args)
    if len(dataset) == 0:
        raise ValueError("The data set is empty.")
    if args.interleaved:  # documents spread evenly over the data set, each image with the text before it
        images, captions, skipped = captioned_images(dataset, args.num_samples, args.strict_data)
        print(f"{len(images)} captioned images from the documents ({skipped} with an unreadable image skipped)")
    else:
        # Evenly spread rows, not the first ones: a folder sorted by class must not give one class.
        chosen = dataset.select(spread_rows(len(dataset), args.num_samples))
        images, captions, _ = decode_rows(chosen["image"], chosen["text"], strict=args.strict_data)
    if not images and args.interleaved:
        raise ValueError(
            f"None of the documents spread over the data set has a readable image with text before it (its caption; "
            f"{skipped} skipped as unreadable): --interleaved evaluates each image against the text just before it."
        )
    if not images:
        raise ValueError("No readable image among the rows evaluated.")
    pixels = images_to_pixel_values(images, image_size, "crop" if args.center_crop else "default")
    pixels = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [PIL.Image.fromarray(array) for array in pixels], captions


def write_report(args: argparse.Namespace, evaluation: FieldEvaluation, output_dir: Path) -> dict:
    """metrics.json, metrics.md, samples.png and captions.jsonl; returns what metrics.json holds."""
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        name: getattr(args, name)
        for name in (
            "pretrained_model_name_or_path",
            "dataset_name",
            "train_data_dir",
            "dataset_split",
            "fid_feature_extractor",
            "clip_model",
            "num_inference_steps",
            "guidance_scale",
            "seed",
        )
    }
    settings["metrics"] = list(args.metrics)
    report = {**evaluation.metrics, "settings": settings}
    (output_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    title = f"{args.pretrained_model_name_or_path} on {args.dataset_name or args.train_data_dir or 'webdataset'}"
    (output_dir / "metrics.md").write_text(metrics_table(evaluation.metrics, title))
    grid_images, labels = [], []
    for image, prompt in list(zip(evaluation.images, evaluation.prompts))[:16]:
        grid_images.append(image)
        labels.append(f"prompt: {prompt}")
    for image, caption in list(zip(evaluation.real_images, evaluation.predicted_captions))[:8]:
        grid_images.append(image)
        labels.append(f"caption: {caption}")
    if grid_images:
        make_grid(grid_images, labels, columns=8).save(output_dir / "samples.png")
    with (output_dir / "captions.jsonl").open("w") as handle:
        for reference, predicted in zip(evaluation.prompts, evaluation.predicted_captions):
            handle.write(json.dumps({"reference": reference, "generated": predicted}) + "\n")
    return report


def main(argv: list[str] | None = None) -> dict:
    """Evaluate and write the report; returns what metrics.json holds. Every flag is checked, the pipeline and the
    metrics' models are loaded, before any data is read."""
    args = parse_args(argv)
    pipeline = load_pipeline(args)
    field_metrics = FieldMetrics(args.metrics, args.fid_feature_extractor, args.clip_model, device=args.device)
    real_images, captions = load_real_images(args, pipeline.image_size)
    evaluation = evaluate_pipeline(
        pipeline,
        captions,
        real_images,
        field_metrics,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    report = write_report(args, evaluation, Path(args.output_dir))
    print(metrics_table(evaluation.metrics))
    return report


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:  # a bad flag or a missing weight: one line naming it
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
