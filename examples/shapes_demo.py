#!/usr/bin/env python
"""The built-in demo: train a Transfusion model on the captioned shapes from scratch on a CPU, then draw images for
captions never seen in training, caption held-out images, and score both.

    python examples/shapes_demo.py --output_dir outputs/shapes

Writes to --output_dir: the saved pipeline (`TransfusionPipeline.from_pretrained(output_dir)`), `samples.png` (images
for held-out prompts, prompt under each), `captions.png` and `captions.txt` (held-out images and their generated
captions), `loss_curve.png`, and `metrics.json` (the judge's accuracies and, with the `eval` extra, FID / KID on the
shapes feature extractor and caption BLEU-4 / CIDEr). Any extra argument goes to examples/train_transfusion.py and
overrides the training script's default (the package's default recipe, `transfusion_hf.recipes`).

`--task edit` trains the built-in editing task instead (`--dataset shapes_edit`: source image, instruction, target
image), usually from a pipeline this demo saved (`--pretrained_model_name_or_path`, passed on to the training
script), and scores held-out edits (`evaluation.shapes_edit_benchmark`): `metrics.json` and `edits.png` (each source
beside its edit, the instruction under it).

    python examples/shapes_demo.py --task edit --output_dir outputs/shapes_edit \
        --pretrained_model_name_or_path outputs/shapes

`--task edit_documents` trains the same edits written as interleaved documents (`[source, instruction, target]`,
a parquet folder in --output_dir read with `--interleaved`): each image is noised with its own t, or kept clean as
context with `--clean_image_probability`; scored as `--task edit`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from transfusion_hf.data.image_text import aspect_ratio_buckets_from_args
from transfusion_hf.data.shapes_edit import load_shapes_edit_documents
from transfusion_hf.evaluation.field_metrics import FieldMetrics, caption_scores
from transfusion_hf.evaluation.shapes_benchmark import ShapesEvaluation, evaluate_shapes, held_out_samples_grid
from transfusion_hf.evaluation.shapes_edit_benchmark import evaluate_shapes_edit
from transfusion_hf.pipeline_transfusion import TransfusionPipeline
from transfusion_hf.training import parse_args as parse_training_args
from transfusion_hf.visualization import make_grid

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train_transfusion.py"

# Data flags only: the recipe is the training script's default (`transfusion_hf.recipes`, "small": learning rate
# 2e-3, logit-normal times, 2,000 steps of 32). Training stops at that step count, never at a wall-clock cap, so the
# same command and seed give the same model on a fast or a slow machine; the time is reported in metrics.json.
# fmt: off
DEMO_FLAGS = [
    "--dataset", "shapes",
    "--shapes_num_samples", "20000",
    "--logging_steps", "25",
]
# The editing task: the same, on the shapes editing triples.
EDIT_DEMO_FLAGS = [
    "--dataset", "shapes_edit",
    "--shapes_num_samples", "20000",
    "--logging_steps", "25",
]
# The same edits as interleaved documents `[source, instruction, target]` (a parquet folder written by the demo, read
# with --interleaved): each image noised with its own t unless --clean_image_probability keeps it clean.
EDIT_DOCUMENTS_FLAGS = [
    "--interleaved",
    "--logging_steps", "25",
]
EDIT_DOCUMENTS_ROWS = 20000
# fmt: on


def edit_documents_folder(output_dir: Path, seed: int) -> Path:
    """Where the training edits of `seed` go as interleaved documents (the training script's --dataset_name): one
    folder per seed, so a rerun with another --seed in the same --output_dir does not train on the first seed's."""
    return output_dir / "documents" / f"seed_{seed}"


def write_edit_documents(folder: Path, seed: int) -> Path:
    """Write the training edits as interleaved documents (`shapes_edit.load_shapes_edit_documents`) to
    `folder/train.parquet` once (atomically); returns the folder."""
    if not (folder / "train.parquet").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        documents = load_shapes_edit_documents("train", num_samples=EDIT_DOCUMENTS_ROWS, seed=seed)
        documents.to_parquet(str(folder / ".train.parquet"))
        (folder / ".train.parquet").rename(folder / "train.parquet")
    return folder


def edit_metrics(args: argparse.Namespace, pipeline: TransfusionPipeline, output_dir: Path) -> dict:
    """Score `--num_edits` held-out edits, and save `edits.png` (source, edit, ... with the instructions)."""
    print(f"Evaluating {args.num_edits} held-out edits...", flush=True)
    evaluation = evaluate_shapes_edit(
        pipeline,
        num_samples=args.num_edits,
        num_inference_steps=args.eval_inference_steps,
        guidance_scale=args.eval_guidance_scale,
    )
    shown = min(len(evaluation.images), 24)
    pairs = [image for index in range(shown) for image in (evaluation.sources[index], evaluation.images[index])]
    labels = [text for index in range(shown) for text in ("source", evaluation.instructions[index])]
    make_grid(pairs, labels, columns=8).save(output_dir / "edits.png")
    return evaluation.metrics


def plot_loss_curve(log_path: Path, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    steps = [record["step"] for record in records]
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for axis, key in zip(axes, ("loss", "lm_loss", "diffusion_loss")):
        axis.plot(steps, [record[key] for record in records])
        axis.set_title(key)
        axis.set_xlabel("step")
        axis.set_yscale("log")
    figure.tight_layout()
    figure.savefig(output, dpi=100)
    plt.close(figure)


def field_metrics(evaluation: ShapesEvaluation) -> dict:
    """The field's numbers next to the judge's, from what the evaluation already made: FID / KID of the generated
    held-out images against the held-out drawings (the shapes feature extractor, `transfusion_hf.evaluation`), BLEU-4
    and CIDEr of the generated captions. Skipped, with a note, without the `eval` extra's packages."""
    try:
        scores = FieldMetrics("fid,kid,caption", "shapes").image_scores(evaluation.caption_images, evaluation.images)
        captions = caption_scores(evaluation.predicted_captions, evaluation.reference_captions)
    except (ValueError, ImportError) as error:
        print(f"Field metrics skipped: {error}", flush=True)
        return {}
    return {**scores, "caption_bleu_4": captions["bleu_4"], "caption_cider": captions["cider"]}


def generation_metrics(
    args: argparse.Namespace, pipeline: TransfusionPipeline, output_dir: Path, image_sizes: list | None
) -> dict:
    """Score text-to-image and captioning on the held-out combinations, and save `samples.png`, `captions.png` and
    `captions.txt`."""
    print("Evaluating on the 48 held-out combinations...", flush=True)
    evaluation = evaluate_shapes(
        pipeline,
        images_per_caption=args.images_per_caption,
        num_inference_steps=args.eval_inference_steps,
        guidance_scale=args.eval_guidance_scale,
        image_sizes=image_sizes,
    )
    held_out_samples_grid(evaluation.prompts, evaluation.images, args.images_per_caption).save(
        output_dir / "samples.png"
    )
    make_grid(evaluation.caption_images[:48], evaluation.predicted_captions[:48], columns=8).save(
        output_dir / "captions.png"
    )
    lines = [f"{ref}\t->\t{pred}" for ref, pred in zip(evaluation.reference_captions, evaluation.predicted_captions)]
    (output_dir / "captions.txt").write_text("reference\t->\tgenerated\n" + "\n".join(lines) + "\n")
    return {**evaluation.metrics, **field_metrics(evaluation)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/shapes")
    parser.add_argument("--images_per_caption", type=int, default=2)
    parser.add_argument("--eval_guidance_scale", type=float, default=3.0)
    parser.add_argument("--eval_inference_steps", type=int, default=25)
    parser.add_argument("--skip_training", action="store_true", help="Only evaluate the pipeline in --output_dir.")
    parser.add_argument(
        "--task",
        choices=["generate", "edit", "edit_documents"],
        default="generate",
        help="generate: text-to-image and captions on the shapes; edit: the shapes editing task (--dataset "
        "shapes_edit), e.g. from a saved pipeline with --pretrained_model_name_or_path; edit_documents: the same "
        "edits written as interleaved documents and trained with --interleaved (scored as edit).",
    )
    parser.add_argument("--num_edits", type=int, default=96, help="Held-out edits scored with --task edit.")
    parser.add_argument(
        "--eval_device", default="cuda" if torch.cuda.is_available() else "cpu", help="Device of the evaluation."
    )
    args, train_overrides = parser.parse_known_args(argv)
    output_dir = Path(args.output_dir)
    started = time.time()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    # Two training flags read before the training script checks them all (a check may load data): the seed draws the
    # documents of --task edit_documents, the buckets are the sizes an evaluation scores.
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--seed", type=int, default=0)
    peek.add_argument("--aspect_ratio_buckets", default=None)
    peeked = peek.parse_known_args(train_overrides)[0]
    demo_flags = {"edit": EDIT_DEMO_FLAGS, "edit_documents": EDIT_DOCUMENTS_FLAGS}.get(args.task, DEMO_FLAGS)
    documents = edit_documents_folder(output_dir, peeked.seed)
    if args.task == "edit_documents" and not args.skip_training:
        demo_flags = demo_flags + ["--dataset_name", str(documents)]
    train_argv = demo_flags + ["--output_dir", str(output_dir)] + train_overrides
    if args.skip_training:
        image_sizes = aspect_ratio_buckets_from_args(peeked)
    else:
        # The documents first (the flags' check loads --dataset_name; ~1 s for 20,000), removed again when a bad flag
        # fails the check, in a second, with one line naming it; the run's aspect-ratio buckets are evaluated.
        written = [folder for folder in (output_dir, documents.parent, documents) if not folder.exists()]
        if args.task == "edit_documents":
            write_edit_documents(documents, peeked.seed)
        try:
            image_sizes = aspect_ratio_buckets_from_args(parse_training_args(train_argv))
        except (ValueError, SystemExit):
            for folder in reversed(written):
                shutil.rmtree(folder, ignore_errors=True)
            raise
        # The training script runs as the user would run it (its own process, its own logging).
        result = subprocess.run([sys.executable, str(TRAIN_SCRIPT), *train_argv])
        if result.returncode:
            raise SystemExit(result.returncode)
    trained = time.time()
    pipeline = TransfusionPipeline.from_pretrained(output_dir).to(args.eval_device)
    pipeline.set_progress_bar_config(disable=True)
    if args.task in ("edit", "edit_documents"):
        metrics = edit_metrics(args, pipeline, output_dir)
    else:
        metrics = generation_metrics(args, pipeline, output_dir, image_sizes)
    metrics["train_minutes"] = round((trained - started) / 60, 2)
    metrics["eval_minutes"] = round((time.time() - trained) / 60, 2)
    summary_path = output_dir / "training_summary.json"
    if summary_path.is_file():
        metrics["global_step"] = json.loads(summary_path.read_text())["global_step"]
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log_path = output_dir / "logs" / "train_log.jsonl"
    if log_path.is_file():
        plot_loss_curve(log_path, output_dir / "loss_curve.png")
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:  # a bad argument: one line naming it, as train_transfusion.py does
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
