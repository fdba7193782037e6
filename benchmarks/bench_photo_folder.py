"""A second real-looking image folder, unlike rendered text: 32x32 crops of real photographs, captioned by class.

The photographs are those that ship inside scikit-image's wheel (`skimage.data`, no download): brick, grass and gravel
textures, coins, the moon, a cup of coffee, a cat's fur and the Hubble deep field. Each image is a random square crop
(a fifth to a half of the photo's shorter side, random flip and quarter turn, brightness within 10%) resized to
32x32, captioned `a photo of {class}`. A user's folder of class-captioned photos is the same shape of problem: the
prompt names the class; nothing else in the caption says what to draw.

    pip install scikit-image
    python benchmarks/bench_photo_folder.py --prepare --work_dir W            # the folder (PNG + metadata.jsonl)
    accelerate launch examples/train_transfusion.py --train_data_dir W/photo_folder --resolution 32 --output_dir R
    python benchmarks/bench_photo_folder.py --evaluate R --work_dir W         # the judge's scores, json + grid

The judge is a small CNN trained on other crops of the same photographs (its accuracy on held-out crops is printed and
saved): text-to-image accuracy is the share of generated images it reads as the prompted class; caption accuracy the
share of held-out real crops whose generated caption names their class. Diversity compares the samples of one prompt
with real crops of that class: the mean pairwise distance between samples over that between real crops (1: as varied
as the data; near 0: one image drawn again and again).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

CLASSES = {
    "brick wall": "brick",
    "grass": "grass",
    "gravel": "gravel",
    "coins": "coins",
    "the moon": "moon",
    "coffee": "coffee",
    "cat fur": "chelsea",
    "galaxies": "hubble_deep_field",
}
RESOLUTION = 32
JUDGE_SEED, FOLDER_SEED, EVAL_SEED = 1234, 0, 99


def photographs() -> dict[str, np.ndarray]:
    """Class name -> RGB uint8 photograph (grayscale ones stacked to 3 channels)."""
    try:
        import skimage.data
    except ImportError as error:
        raise SystemExit("bench_photo_folder.py needs scikit-image: pip install scikit-image") from error
    photos = {}
    for name, source in CLASSES.items():
        image = getattr(skimage.data, source)()
        photos[name] = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]
    return photos


def random_crop(photo: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """One 32x32 crop: a square of 1/5 to 1/2 of the shorter side, flipped, turned, brightness jittered."""
    height, width = photo.shape[:2]
    side = int(rng.uniform(0.2, 0.5) * min(height, width))
    top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
    crop = photo[top : top + side, left : left + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    crop = np.rot90(crop, k=int(rng.integers(0, 4)))
    crop = np.clip(crop.astype(np.float32) * rng.uniform(0.9, 1.1), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(crop)).resize((RESOLUTION, RESOLUTION), Image.BICUBIC)


def sample_crops(num_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`(N, 32, 32, 3)` uint8 crops and their class indices, classes in `CLASSES` order."""
    photos, images, labels = photographs(), [], []
    for index, photo in enumerate(photos.values()):
        rng = np.random.default_rng([seed, index])
        images += [np.asarray(random_crop(photo, rng)) for _ in range(num_per_class)]
        labels += [index] * num_per_class
    return np.stack(images), np.array(labels)


def write_folder(folder: Path, num_images: int, seed: int = FOLDER_SEED) -> None:
    """The image folder in diffusers' convention: PNG files and `metadata.jsonl` with `file_name` and `text`."""
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = sample_crops(num_images // len(CLASSES), seed)
    names = list(CLASSES)
    with (folder / "metadata.jsonl").open("w") as metadata:
        for index, (image, label) in enumerate(zip(images, labels)):
            file_name = f"{index:06d}.png"
            Image.fromarray(image).save(folder / file_name)
            metadata.write(json.dumps({"file_name": file_name, "text": f"a photo of {names[label]}"}) + "\n")


class PhotoClassifier(nn.Module):
    """Three conv blocks and a linear head over 32x32 RGB in [-1, 1]."""

    def __init__(self, num_classes: int = len(CLASSES)) -> None:
        super().__init__()
        layers, channels = [], 3
        for width in (32, 64, 128):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_judge(path: Path, num_per_class: int = 1500, steps: int = 1200) -> tuple[PhotoClassifier, float]:
    """Train (or load from `path`) the judge on crops of seed `JUDGE_SEED`; its accuracy on crops of another seed."""
    model = PhotoClassifier()
    if path.is_file():
        payload = torch.load(path, weights_only=True)
        model.load_state_dict(payload["state_dict"])
        return model.eval(), payload["accuracy"]
    torch.manual_seed(0)
    images, labels = sample_crops(num_per_class, JUDGE_SEED)
    inputs, targets = to_tensor(images), torch.from_numpy(labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = torch.randint(0, len(inputs), (128,), generator=generator)
        loss = nn.functional.cross_entropy(model(inputs[batch]), targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    test_images, test_labels = sample_crops(250, JUDGE_SEED + 1)
    accuracy = float((classify(model, test_images) == test_labels).mean())
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "accuracy": accuracy}, path)
    return model, accuracy


@torch.no_grad()
def classify(model: PhotoClassifier, images: np.ndarray) -> np.ndarray:
    return torch.cat([model(to_tensor(images[i : i + 256])).argmax(1) for i in range(0, len(images), 256)]).numpy()


def pairwise_spread(images: np.ndarray) -> float:
    """Mean pairwise RMS distance between images (float pixels in [0, 1])."""
    flat = images.reshape(len(images), -1).astype(np.float64) / 255
    distances = np.sqrt(((flat[:, None] - flat[None]) ** 2).mean(-1))
    return float(distances[np.triu_indices(len(images), 1)].mean())


def evaluate(run_dir: Path, judge: PhotoClassifier, images_per_class: int, guidance_scale: float, steps: int) -> dict:
    """Text-to-image, caption and diversity scores of a saved pipeline; writes `photo_samples.png` in `run_dir`."""
    from transfusion_hf import TransfusionPipeline
    from transfusion_hf.visualization import make_grid

    pipeline = TransfusionPipeline.from_pretrained(run_dir)
    pipeline.set_progress_bar_config(disable=True)
    names = list(CLASSES)
    prompts = [f"a photo of {name}" for name in names for _ in range(images_per_class)]
    generator = torch.Generator().manual_seed(EVAL_SEED)
    generated = []
    for start in range(0, len(prompts), 32):
        batch = prompts[start : start + 32]
        output = pipeline(batch, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator)
        generated += [np.asarray(image.convert("RGB")) for image in output.images]
    generated = np.stack(generated)
    labels = np.repeat(np.arange(len(names)), images_per_class)
    read_right = classify(judge, generated) == labels
    real, real_labels = sample_crops(images_per_class, EVAL_SEED)
    spread_ratio = [
        pairwise_spread(generated[labels == c]) / max(pairwise_spread(real[real_labels == c]), 1e-9)
        for c in range(len(names))
    ]
    captioned, caption_labels = sample_crops(10, EVAL_SEED + 1)
    captions = pipeline.caption([Image.fromarray(image) for image in captioned], max_new_tokens=12)
    caption_right = [names[label] in caption for caption, label in zip(captions, caption_labels)]
    grid = make_grid([Image.fromarray(image) for image in generated], prompts, columns=images_per_class)
    grid.save(run_dir / "photo_samples.png")
    return {
        "t2i_accuracy": float(read_right.mean()),
        "t2i_per_class": {name: float(read_right[labels == c].mean()) for c, name in enumerate(names)},
        "caption_accuracy": float(np.mean(caption_right)),
        "diversity_ratio": float(np.mean(spread_ratio)),
        "diversity_ratio_per_class": dict(zip(names, map(float, spread_ratio))),
        "samples_grid": str(run_dir / "photo_samples.png"),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work_dir", default="outputs/photo_folder")
    parser.add_argument("--prepare", action="store_true", help="write the image folder and train the judge")
    parser.add_argument("--num_images", type=int, default=16000)
    parser.add_argument("--evaluate", default=None, help="a saved pipeline folder to score")
    parser.add_argument("--images_per_class", type=int, default=12)
    parser.add_argument("--guidance_scale", type=float, default=3.0)
    parser.add_argument("--num_inference_steps", type=int, default=25)
    args = parser.parse_args(argv)
    if not args.prepare and args.evaluate is None:
        parser.error("give --prepare, --evaluate RUN, or both")
    if args.num_images < len(CLASSES) or args.images_per_class < 2:
        parser.error(f"--num_images must be >= {len(CLASSES)} and --images_per_class >= 2")
    work_dir = Path(args.work_dir)
    result: dict = {}
    if args.prepare:
        started = time.time()
        write_folder(work_dir / "photo_folder", args.num_images)
        print(f"Wrote {args.num_images} crops to {work_dir / 'photo_folder'} in {time.time() - started:.1f} s.")
    judge, accuracy = train_judge(work_dir / "photo_judge.pt")
    print(f"Judge accuracy on held-out real crops: {accuracy:.3f}")
    result["judge_accuracy"] = accuracy
    if args.evaluate is not None:
        run_dir = Path(args.evaluate)
        result.update(evaluate(run_dir, judge, args.images_per_class, args.guidance_scale, args.num_inference_steps))
        (run_dir / "photo_metrics.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
