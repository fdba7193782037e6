"""Two real-looking image folders a user could own, captioned by class: photographs and handwritten digits.

`photos`: 32x32 crops of the real photographs that ship inside scikit-image's wheel (`skimage.data`, no download):
brick, grass and gravel textures, coins, the moon, a cup of coffee, a cat's fur and the Hubble deep field. Each image
is a random square crop (a fifth to a half of the photo's shorter side, random flip and quarter turn, brightness within
10%) resized to 32x32, captioned `a photo of {class}`.

`digits`: the handwritten digits that ship inside scikit-learn's wheel (`sklearn.datasets.load_digits`, 1,797 scans
by 43 writers, 8x8, 16 grey levels; no download), upscaled to 32x32 grey, captioned `a handwritten {word}` ("a
handwritten seven"). The first 1,300 scans form the training folder; the other 497 are held out: the judge is tested,
captions are read and the diversity reference is drawn there, so no score reads an image the model trained on.

In both the prompt names the class and nothing else in the caption says what to draw: a user's folder of
class-captioned images is the same shape of problem.

    pip install scikit-image scikit-learn
    python benchmarks/bench_real_folders.py --folder photos --prepare --work_dir W   # PNG + metadata.jsonl
    accelerate launch examples/train_transfusion.py --train_data_dir W/photos --resolution 32 --output_dir R
    python benchmarks/bench_real_folders.py --folder photos --evaluate R --work_dir W # json + grid

The judge is a small CNN trained on other images of the same source (its accuracy on held-out images is printed and
saved): text-to-image accuracy is the share of generated images it reads as the prompted class; caption accuracy the
share of held-out real images whose generated caption names their class. Diversity compares the samples of one prompt
with real images of that class: the mean pairwise distance between samples over that between real images (1: as
varied as the data; near 0: one image drawn again and again).
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

RESOLUTION = 32
JUDGE_SEED, FOLDER_SEED, EVAL_SEED = 1234, 0, 99
# The splits every world serves: the training folder, the judge's training and test images, the real references of
# the diversity score, the real images to caption.
SPLITS = ("folder", "judge", "judge_test", "reference", "caption")


class PhotoWorld:
    """Random crops of scikit-image's photographs; every split is a fresh draw of its own seed."""

    name = "photos"
    sources = {
        "brick wall": "brick",
        "grass": "grass",
        "gravel": "gravel",
        "coins": "coins",
        "the moon": "moon",
        "coffee": "coffee",
        "cat fur": "chelsea",
        "galaxies": "hubble_deep_field",
    }
    classes = list(sources)
    seeds = {"folder": FOLDER_SEED, "judge": JUDGE_SEED, "judge_test": JUDGE_SEED + 1}
    seeds.update(reference=EVAL_SEED, caption=EVAL_SEED + 1)

    def caption(self, label: int) -> str:
        return f"a photo of {self.classes[label]}"

    def photographs(self) -> list[np.ndarray]:
        """RGB uint8 photographs in `classes` order (grayscale ones stacked to 3 channels)."""
        try:
            import skimage.data
        except ImportError as error:
            raise SystemExit("--folder photos needs scikit-image: pip install scikit-image") from error
        photos = [getattr(skimage.data, source)() for source in self.sources.values()]
        return [np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3] for image in photos]

    def sample(self, split: str, num_per_class: int, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`(N, 32, 32, 3)` uint8 crops and their class indices, `num_per_class` of each class in order."""
        seed = self.seeds[split] if seed is None else seed
        images, labels = [], []
        for index, photo in enumerate(self.photographs()):
            rng = np.random.default_rng([seed, index])
            images += [np.asarray(random_crop(photo, rng)) for _ in range(num_per_class)]
            labels += [index] * num_per_class
        return np.stack(images), np.array(labels)


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


class DigitWorld:
    """scikit-learn's handwritten digits: a fixed training folder and held-out scans for every score.

    The judge trains on the folder's scans shifted by up to 2 pixels (1,300 scans are too few for a CNN otherwise);
    the held-out scans are split between the judge's test, the diversity reference and the captions by position.
    """

    name = "digits"
    classes = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    num_train = 1300

    def caption(self, label: int) -> str:
        return f"a handwritten {self.classes[label]}"

    def scans(self) -> tuple[np.ndarray, np.ndarray]:
        """`(1797, 32, 32, 3)` uint8 grey scans (ink bright, as scanned) and their digits."""
        try:
            from sklearn.datasets import load_digits
        except ImportError as error:
            raise SystemExit("--folder digits needs scikit-learn: pip install scikit-learn") from error
        digits = load_digits()
        grey = [Image.fromarray((image * 255 / 16).astype(np.uint8)) for image in digits.images]
        images = np.stack([np.asarray(image.resize((RESOLUTION, RESOLUTION), Image.BICUBIC)) for image in grey])
        return np.repeat(images[..., None], 3, axis=3), digits.target.astype(np.int64)

    def sample(self, split: str, num_per_class: int, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`num_per_class` scans of each digit in order, from the split's own scans (with replacement only for the
        judge, whose scans are shifted at random)."""
        images, labels = self.scans()
        held_out = np.arange(self.num_train, len(labels))
        pool = {
            "folder": np.arange(self.num_train),
            "judge": np.arange(self.num_train),
            "judge_test": held_out,
            "reference": held_out[0::2],
            "caption": held_out[1::2],
        }[split]
        rng = np.random.default_rng(JUDGE_SEED if seed is None else seed)
        chosen = []
        for digit in range(len(self.classes)):
            candidates = pool[labels[pool] == digit]
            if split == "judge":
                chosen.append(rng.choice(candidates, num_per_class, replace=True))
            else:
                chosen.append(candidates[: min(num_per_class, len(candidates))])
        order = np.concatenate(chosen)
        picked = images[order]
        if split == "judge":
            shifts = rng.integers(-2, 3, size=(len(order), 2))
            picked = np.stack([np.roll(image, tuple(shift), axis=(0, 1)) for image, shift in zip(picked, shifts)])
        return picked, labels[order]


WORLDS = {"photos": PhotoWorld, "digits": DigitWorld}


def write_folder(world, folder: Path, num_images: int) -> int:
    """The image folder in diffusers' convention: PNG files and `metadata.jsonl` with `file_name` and `text`.

    Returns the number of images written (the digits' folder holds at most its 1,300 training scans)."""
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = world.sample("folder", num_images // len(world.classes))
    with (folder / "metadata.jsonl").open("w") as metadata:
        for index, (image, label) in enumerate(zip(images, labels)):
            file_name = f"{index:06d}.png"
            Image.fromarray(image).save(folder / file_name)
            metadata.write(json.dumps({"file_name": file_name, "text": world.caption(int(label))}) + "\n")
    return len(images)


class FolderJudge(nn.Module):
    """Three conv blocks and a linear head over 32x32 RGB in [-1, 1]."""

    def __init__(self, num_classes: int) -> None:
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


def train_judge(world, path: Path, num_per_class: int = 1500, steps: int = 1200) -> tuple[FolderJudge, float]:
    """Train (or load from `path`) the judge on the world's `judge` split; its accuracy on the `judge_test` split."""
    model = FolderJudge(len(world.classes))
    if path.is_file():
        payload = torch.load(path, weights_only=True)
        model.load_state_dict(payload["state_dict"])
        return model.eval(), payload["accuracy"]
    torch.manual_seed(0)
    images, labels = world.sample("judge", num_per_class)
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
    test_images, test_labels = world.sample("judge_test", 250)
    accuracy = float((classify(model, test_images) == test_labels).mean())
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "accuracy": accuracy}, path)
    return model, accuracy


@torch.no_grad()
def classify(model: FolderJudge, images: np.ndarray) -> np.ndarray:
    return torch.cat([model(to_tensor(images[i : i + 256])).argmax(1) for i in range(0, len(images), 256)]).numpy()


def caption_names(caption: str, name: str) -> bool:
    """Whether a generated caption names the class `name` as whole words ("one" is not read inside "someone")."""
    return f" {name} " in f" {' '.join(caption.split())} "


def pairwise_spread(images: np.ndarray) -> float:
    """Mean pairwise RMS distance between images (float pixels in [0, 1])."""
    flat = images.reshape(len(images), -1).astype(np.float64) / 255
    distances = np.sqrt(((flat[:, None] - flat[None]) ** 2).mean(-1))
    return float(distances[np.triu_indices(len(images), 1)].mean())


def evaluate(
    world, run_dir: Path, judge: FolderJudge, images_per_class: int, guidance_scale: float, steps: int
) -> dict:
    """Text-to-image, caption and diversity scores of a saved pipeline; writes `{world}_samples.png` in `run_dir`."""
    from transfusion_hf import TransfusionPipeline
    from transfusion_hf.visualization import make_grid

    pipeline = TransfusionPipeline.from_pretrained(run_dir)
    pipeline.set_progress_bar_config(disable=True)
    names = world.classes
    prompts = [world.caption(label) for label in range(len(names)) for _ in range(images_per_class)]
    generator = torch.Generator().manual_seed(EVAL_SEED)
    generated = []
    for start in range(0, len(prompts), 32):
        batch = prompts[start : start + 32]
        output = pipeline(batch, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator)
        generated += [np.asarray(image.convert("RGB")) for image in output.images]
    generated = np.stack(generated)
    labels = np.repeat(np.arange(len(names)), images_per_class)
    read_right = classify(judge, generated) == labels
    real, real_labels = world.sample("reference", images_per_class)
    spread_ratio = [
        pairwise_spread(generated[labels == c]) / max(pairwise_spread(real[real_labels == c]), 1e-9)
        for c in range(len(names))
    ]
    captioned, caption_labels = world.sample("caption", 10)
    captions = pipeline.caption([Image.fromarray(image) for image in captioned], max_new_tokens=12)
    caption_right = [caption_names(caption, names[label]) for caption, label in zip(captions, caption_labels)]
    grid_path = run_dir / f"{world.name}_samples.png"
    make_grid([Image.fromarray(image) for image in generated], prompts, columns=images_per_class).save(grid_path)
    return {
        "t2i_accuracy": float(read_right.mean()),
        "t2i_per_class": {name: float(read_right[labels == c].mean()) for c, name in enumerate(names)},
        "caption_accuracy": float(np.mean(caption_right)),
        "diversity_ratio": float(np.mean(spread_ratio)),
        "diversity_ratio_per_class": dict(zip(names, map(float, spread_ratio))),
        "caption_examples": [[caption, names[label]] for caption, label in zip(captions[:20], caption_labels[:20])],
        "samples_grid": str(grid_path),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", choices=sorted(WORLDS), default="photos", help="which real-looking folder")
    parser.add_argument("--work_dir", default="outputs/real_folders")
    parser.add_argument("--prepare", action="store_true", help="write the image folder and train the judge")
    parser.add_argument("--num_images", type=int, default=16000)
    parser.add_argument("--evaluate", default=None, help="a saved pipeline folder to score")
    parser.add_argument("--images_per_class", type=int, default=12)
    parser.add_argument("--guidance_scale", type=float, default=3.0)
    parser.add_argument("--num_inference_steps", type=int, default=25)
    args = parser.parse_args(argv)
    if not args.prepare and args.evaluate is None:
        parser.error("give --prepare, --evaluate RUN, or both")
    world = WORLDS[args.folder]()
    if args.num_images < len(world.classes) or args.images_per_class < 2:
        parser.error(f"--num_images must be >= {len(world.classes)} and --images_per_class >= 2")
    if args.evaluate is not None and not (Path(args.evaluate) / "model_index.json").is_file():
        parser.error(f"--evaluate {args.evaluate!r} is not a saved pipeline folder (no model_index.json)")
    work_dir = Path(args.work_dir)
    result: dict = {}
    if args.prepare:
        started = time.time()
        written = write_folder(world, work_dir / world.name, args.num_images)
        print(f"Wrote {written} images to {work_dir / world.name} in {time.time() - started:.1f} s.")
    judge, accuracy = train_judge(world, work_dir / f"{world.name}_judge.pt")
    print(f"Judge accuracy on held-out real images: {accuracy:.3f}")
    result["judge_accuracy"] = accuracy
    if args.evaluate is not None:
        run_dir = Path(args.evaluate)
        scores = evaluate(world, run_dir, judge, args.images_per_class, args.guidance_scale, args.num_inference_steps)
        result.update(scores)
        (run_dir / f"{world.name}_metrics.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
