"""What FID and KID read on known image sets, for the feature extractors the docs' measurements use: a scale to read
a model's score against (docs/evaluation.md).

`shapes`: the shapes feature extractor (`--fid_feature_extractor shapes`) on renders of the captioned shapes. The
reference is `--num_images` renders of the held-out split (seed 0); it is compared with other renders of the held-out
split, renders of the training split, those with pixel noise, blurred, and black images.

`digits`: writes the held-out digits folder (the 497 scikit-learn scans that bench_real_folders.py keeps out of the
training folder) and the digits judge's features as a `.pt2` extractor (its three conv blocks, average-pooled to 128
features, scaled to a root mean square of 1 on the training scans); the reference is the `--num_images` held-out scans
that `examples/evaluate.py --num_samples N` picks (spread evenly), compared with the other held-out scans, scans of
the training folder, those with pixel noise, blurred, and black images.

`photos`: the same for the photo folder of bench_real_folders.py: the held-out folder is `--num_images` fresh crops
(its `reference` split, the same number of each class), the extractor the photo judge's features; compared with other
held-out crops (its `caption` split), crops of the training folder, those with pixel noise, blurred, and black images.

`glyphs`: the built-in glyphs' held-out combinations: the held-out folder is `--num_images` renders of the held-out
split; the extractor is a judge of the same architecture trained here to read the character from renders of the
training split (the package's glyph judge reads colour-split maps, which `torch.export` cannot trace); compared with
other held-out renders, renders of the training split, those with pixel noise, blurred, and black images.

    python benchmarks/bench_field_metrics.py --world shapes --num_images 192
    python benchmarks/bench_field_metrics.py --world digits --num_images 200 --work_dir outputs/real_folders
    python benchmarks/bench_field_metrics.py --world photos --num_images 200 --work_dir outputs/real_folders
    python benchmarks/bench_field_metrics.py --world glyphs --num_images 200 --work_dir outputs/real_folders

`--validation_cost PIPELINE`: what `--validation_metrics fid,kid,caption,perplexity` adds to the shapes demo's
training.

    python benchmarks/bench_field_metrics.py --validation_cost outputs/shapes
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageFilter
import torch

from transfusion_hf.data.glyphs import CHARACTERS, render_glyphs
from transfusion_hf.data.glyphs import sample_specs as glyph_specs
from transfusion_hf.data.shapes import draw_shape, sample_specs
from transfusion_hf.evaluation import FieldMetrics, load_shapes_feature_extractor, save_feature_extractor
from transfusion_hf.evaluation.feature_extractors import ShapesExtractorTrainingConfig
from transfusion_hf.recipes import load_recipe

# The demo's step count: the default recipe's (validation's share of the demo is measured against it).
DEMO_STEPS = load_recipe().training["max_train_steps"]

RESULTS = Path(__file__).resolve().parent / "results"


def noised(images: list[PIL.Image.Image], sigma: float, seed: int = 0) -> list[PIL.Image.Image]:
    """Gaussian pixel noise of `sigma` (of 255), clipped."""
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(image, dtype=np.float32) + rng.normal(0, sigma, (*image.size[::-1], 3)) for image in images]
    return [PIL.Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)) for array in arrays]


def blurred(images: list[PIL.Image.Image]) -> list[PIL.Image.Image]:
    return [image.filter(PIL.ImageFilter.GaussianBlur(1)) for image in images]


def shapes_sets(num_images: int) -> tuple[list[PIL.Image.Image], dict[str, list[PIL.Image.Image]]]:
    """The reference renders and the sets compared with them."""

    def renders(split: str, seed: int) -> list[PIL.Image.Image]:
        return [draw_shape(spec, jitter) for spec, jitter in sample_specs(split, num_images, seed=seed)]

    other = renders("held_out", 1)
    return renders("held_out", 0), {
        "other renders of the held-out captions": other,
        "renders of the training captions": renders("train", 1),
        "other renders + pixel noise sigma 10": noised(other, 10),
        "other renders + pixel noise sigma 20": noised(other, 20),
        "other renders blurred (Gaussian, 1 px)": blurred(other),
        "black images": [PIL.Image.new("RGB", (32, 32))] * num_images,
    }


class JudgeFeatures(torch.nn.Module):
    """The digits judge's conv blocks as an FID extractor: images in [0, 1] -> 128 features, times `scale`."""

    def __init__(self, features: torch.nn.Module, scale: float) -> None:
        super().__init__()
        self.features = features
        self.register_buffer("scale", torch.tensor(scale))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images * 2 - 1) * self.scale


def prepare_digits(work_dir: Path) -> tuple[Path, Path, list[PIL.Image.Image], list[PIL.Image.Image]]:
    """The held-out folder, the exported judge features, and the held-out and training scans as images."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_real_folders import DigitWorld, to_tensor, train_judge

    world = DigitWorld()
    scans, labels = world.scans()
    folder = work_dir / "digits_held_out"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "metadata.jsonl").open("w") as metadata:
        for index in range(world.num_train, len(labels)):
            PIL.Image.fromarray(scans[index]).save(folder / f"{index:06d}.png")
            metadata.write(json.dumps({"file_name": f"{index:06d}.png", "text": world.caption(int(labels[index]))}))
            metadata.write("\n")
    judge, _ = train_judge(world, work_dir / "digits_judge.pt")
    with torch.no_grad():
        scale = float(judge.eval().features(to_tensor(scans[: world.num_train])).square().mean().rsqrt())
    extractor = save_feature_extractor(JudgeFeatures(judge.features, scale), work_dir / "digits_judge_features.pt2")
    images = [PIL.Image.fromarray(scan) for scan in scans]
    return folder, extractor, images[world.num_train :], images[: world.num_train]


class GlyphWorld:
    """The built-in glyphs as a bench_real_folders world: the judge learns the character from renders of the
    training split and is tested on the held-out split's (unseen character-colour combinations)."""

    name = "glyphs"
    classes = list(CHARACTERS)
    seeds = {"folder": 0, "judge": 1234, "judge_test": 1235, "reference": 99, "caption": 100}

    def caption(self, label: int) -> str:
        return f"the character {self.classes[label]}"

    def sample(self, split: str, num_per_class: int, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`num_per_class * 10` renders (classes as drawn, about balanced) and their character indices."""
        data_split = "train" if split in ("folder", "judge") else "held_out"
        specs, images = render_glyphs(
            data_split, num_per_class * len(self.classes), self.seeds[split] if seed is None else seed
        )
        return images, np.array([self.classes.index(spec.character) for spec in specs])


def write_held_out_folder(folder: Path, images: np.ndarray, captions: list[str]) -> Path:
    """A diffusers image folder (PNG files and `metadata.jsonl`) of held-out images for `examples/evaluate.py`."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "metadata.jsonl").open("w") as metadata:
        for index, (image, caption) in enumerate(zip(images, captions)):
            PIL.Image.fromarray(image).save(folder / f"{index:06d}.png")
            metadata.write(json.dumps({"file_name": f"{index:06d}.png", "text": caption}) + "\n")
    return folder


def prepare_world(
    name: str, work_dir: Path, num_images: int
) -> tuple[Path, Path, list[PIL.Image.Image], dict[str, list[PIL.Image.Image]]]:
    """`photos` or `glyphs`: the held-out folder, the exported judge features, the reference (the folder's images)
    and the sets compared with it."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_real_folders import PhotoWorld, to_tensor, train_judge

    world = PhotoWorld() if name == "photos" else GlyphWorld()
    per_class = -(-num_images // len(world.classes))
    held_out, labels = world.sample("reference", per_class)
    held_out, labels = held_out[:num_images], labels[:num_images]
    captions = [world.caption(int(label)) for label in labels]
    if name == "glyphs":  # the held-out renders keep their data set captions (colours and background)
        specs = glyph_specs("held_out", num_images, world.seeds["reference"])  # the rows just drawn, not redrawn
        captions = [spec.caption for spec in specs]
    folder = write_held_out_folder(work_dir / f"{name}_held_out", held_out, captions)
    judge, accuracy = train_judge(world, work_dir / f"{name}_judge.pt")
    print(f"{name} judge: {accuracy:.3f} of its held-out test images read right")
    training, _ = world.sample("folder", per_class)
    with torch.no_grad():
        scale = float(judge.eval().features(to_tensor(training)).square().mean().rsqrt())
    extractor = save_feature_extractor(JudgeFeatures(judge.features, scale), work_dir / f"{name}_judge_features.pt2")
    other, _ = world.sample("caption", per_class)
    as_images = [PIL.Image.fromarray(array) for array in training[:num_images]]
    return (
        folder,
        extractor,
        [PIL.Image.fromarray(array) for array in held_out],
        {
            "other held-out images": [PIL.Image.fromarray(array) for array in other[:num_images]],
            "images of the training folder": as_images,
            "training images + pixel noise sigma 20": noised(as_images, 20),
            "training images blurred (Gaussian, 1 px)": blurred(as_images),
            "black images": [PIL.Image.new("RGB", (32, 32))] * num_images,
        },
    )


def digits_sets(
    held_out: list[PIL.Image.Image], training: list[PIL.Image.Image], num_images: int
) -> tuple[list[PIL.Image.Image], dict[str, list[PIL.Image.Image]]]:
    """The reference (the held-out scans examples/evaluate.py picks) and the sets compared with them."""
    picked = torch.linspace(0, len(held_out) - 1, num_images).round().long().unique().tolist()
    rest = [image for index, image in enumerate(held_out) if index not in set(picked)]
    spread = [training[index] for index in torch.linspace(0, len(training) - 1, num_images).round().long().tolist()]
    return [held_out[index] for index in picked], {
        f"the other {len(rest)} held-out scans": rest,
        f"{num_images} scans of the training folder": spread,
        "training scans + pixel noise sigma 20": noised(spread, 20),
        "training scans blurred (Gaussian, 1 px)": blurred(spread),
        "black images": [PIL.Image.new("RGB", (32, 32))] * num_images,
    }


def validation_cost(pipeline_path: str, rounds: int = 3, steps: int = 8) -> list[dict]:
    """Seconds of one validation with `fid,kid,caption,perplexity` (shapes extractor, the default 24 examples, 25
    steps, guidance 3) against one training step of the pipeline's model (batch 32, forward + backward + AdamW),
    alternated in one process for `rounds` rounds so that the machine's load hits both alike; `demo_share` is what the
    demo's 6 validations add to its 1,700 steps."""
    from transfusion_hf.data.collator import TransfusionDataCollator
    from transfusion_hf.data.shapes import load_shapes_dataset
    from transfusion_hf.evaluation import evaluate_pipeline
    from transfusion_hf.pipeline_transfusion import TransfusionPipeline
    from transfusion_hf.processing_transfusion import images_to_pixel_values
    from transfusion_hf.training import build_noiser, parse_args

    pipeline = TransfusionPipeline.from_pretrained(pipeline_path)
    pipeline.set_progress_bar_config(disable=True)
    model = pipeline.transformer
    prediction_type = model.config.prediction_type
    noiser = build_noiser(parse_args(["--dataset", "shapes", "--prediction_type", prediction_type]), prediction_type)
    context = model.config.text_config.max_position_embeddings
    collator = TransfusionDataCollator(pipeline.processor, noiser, max_length=context)
    data = load_shapes_dataset("train", 32 * steps, seed=0)
    images, captions = list(data["image"]), list(data["text"])
    pixels = images_to_pixel_values(images, pipeline.image_size)
    examples = [{"text": caption, "latents": latents} for caption, latents in zip(captions, pixels)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    metrics = FieldMetrics("fid,kid,caption,perplexity", "shapes")
    picked = torch.linspace(0, len(images) - 1, 24).round().long().tolist()
    result = []
    for _ in range(rounds):
        model.train()
        started = time.perf_counter()
        for step in range(steps):
            loss = model(**collator(examples[step * 32 : (step + 1) * 32]), use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        step_seconds = (time.perf_counter() - started) / steps
        started = time.perf_counter()
        evaluate_pipeline(pipeline, [captions[i] for i in picked], [images[i] for i in picked], metrics, batch_size=24)
        seconds = time.perf_counter() - started
        result.append({"step_seconds": step_seconds, "validation_seconds": seconds,
                       "demo_share": 6 * seconds / (DEMO_STEPS * step_seconds)})  # fmt: skip
        print(json.dumps(result[-1]), flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", choices=["shapes", "digits", "photos", "glyphs"], default="shapes")
    parser.add_argument("--num_images", type=int, default=192, help="images of the reference and of each set")
    parser.add_argument(
        "--work_dir", default="outputs/real_folders", help="digits, photos, glyphs: where the folder and .pt2 go"
    )
    parser.add_argument("--output", default=None, help="json (default benchmarks/results/field_metrics_WORLD.json)")
    parser.add_argument("--quick", action="store_true", help="shapes, 16 images, a quickly trained extractor")
    parser.add_argument(
        "--validation_cost", default=None, help="a saved shapes pipeline: time --validation_metrics against its steps"
    )
    args = parser.parse_args(argv)
    if args.validation_cost is not None:
        return {"validation_cost": validation_cost(args.validation_cost)}
    if args.num_images < 4:
        parser.error(f"--num_images must be >= 4, got {args.num_images}")
    if args.quick:
        args.world, args.num_images = "shapes", 16
    result: dict = {"world": args.world, "num_images": args.num_images}
    if args.world == "shapes":
        config = ShapesExtractorTrainingConfig(num_images=480, epochs=1, num_test_images=100) if args.quick else None
        extractor = load_shapes_feature_extractor(config=config, use_cache=not args.quick)
        reference, sets = shapes_sets(args.num_images)
    elif args.world == "digits":
        folder, extractor, held_out, training = prepare_digits(Path(args.work_dir))
        result.update(held_out_folder=str(folder), feature_extractor=str(extractor))
        reference, sets = digits_sets(held_out, training, args.num_images)
    else:
        folder, extractor, reference, sets = prepare_world(args.world, Path(args.work_dir), args.num_images)
        result.update(held_out_folder=str(folder), feature_extractor=str(extractor))
    metrics = FieldMetrics("fid,kid", extractor if isinstance(extractor, torch.nn.Module) else str(extractor))
    result["scores"] = {name: metrics.image_scores(reference, images) for name, images in sets.items()}
    print(f"| compared with the reference ({args.num_images} images) | FID | KID |\n| --- | ---: | ---: |")
    for name, scores in result["scores"].items():
        print(f"| {name} | {scores['fid']:.2f} | {scores['kid_mean']:.3f} |")
    output = Path(args.output) if args.output else RESULTS / f"field_metrics_{args.world}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
