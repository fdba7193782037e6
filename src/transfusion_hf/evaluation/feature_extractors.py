"""Image feature extractors for FID and KID (`evaluation.field_metrics`), chosen by one string or path:

- `"inception"`: torchmetrics' standard InceptionV3 (the weights of the FID paper, through `torch-fidelity`, downloaded
  on first use): the number the field reports. Offline it cannot load, and the error says what to pass instead.
- `"shapes"`: [`ShapesFeatureExtractor`], a small CNN trained here to read size, colour, shape and position from the
  built-in captioned shapes (`data.shapes`); its 64 features make an FID that means something for that world without
  any download. Trained on first use (~1 minute on one CPU core) and cached like the glyph judge.
- a `.pt2` file: any module exported with `torch.export` (write one with [`save_feature_extractor`]) that maps images
  `(N, 3, H, W)` in [0, 1] to features `(N, D)`: a network of your own trained on your data. Images of another size
  than it was exported for are resized to it.

Every extractor takes images as float tensors `(N, 3, H, W)` in [0, 1]; torchmetrics' FID and KID are built with
`normalize=True`, which is that convention for both the standard and a custom network.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.shapes import COLORS, IMAGE_SIZE, POSITIONS, SHAPES, SIZES, draw_shape, sample_specs
from .glyph_judge import _save_atomically, check_training_settings, default_cache_dir

logger = logging.getLogger(__name__)

STANDARD_FEATURE_EXTRACTOR = "inception"
"""torchmetrics' InceptionV3 (2048 pooled features), the field's FID and KID."""

SHAPES_FEATURE_EXTRACTOR = "shapes"
"""[`ShapesFeatureExtractor`], trained here on the captioned shapes."""

SHAPES_EXTRACTOR_VERSION = "1"
"""Bump when the extractor's architecture or training changes, so that stale cached weights are not reused."""

# What the shapes extractor learns to read, in the order of its heads.
SHAPE_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "size": tuple(SIZES),
    "color": tuple(COLORS),
    "shape": SHAPES,
    "position": tuple(POSITIONS),
}
_TRAIN_SEED = 3_000_017  # renders of its own, far from the data sets' usual seeds 0, 1, 2, ...
_TEST_SEED = 4_000_037


class ShapesFeatureExtractor(nn.Module):
    """A small CNN over 32x32 RGB that reads the four attributes of a captioned-shapes image; its penultimate layer
    is the FID feature.

    Three conv + BatchNorm + ReLU + max-pool stages (32 -> 4 px), a linear layer over the 4x4 grid (which keeps where
    the shape is: a global average pool would throw that away) to `num_features` features, then one linear head per
    attribute of `SHAPE_ATTRIBUTES`. Trained by [`train_shapes_feature_extractor`] on clean renders only, so a
    speckled background, blur or a wrong colour moves the features away from those of real images.

    Args:
        widths (`tuple[int, int, int]`, *optional*, defaults to `(16, 32, 48)`): Channels of the three stages.
        num_features (`int`, *optional*, defaults to 64): Size of the feature vector.
    """

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 48), num_features: int = 64) -> None:
        super().__init__()
        stages, channels = [], 3
        for width in widths:
            stages += [
                nn.Conv2d(channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            channels = width
        self.trunk = nn.Sequential(*stages, nn.Flatten(), nn.Linear(channels * 4 * 4, num_features), nn.ReLU())
        self.heads = nn.ModuleDict(
            {name: nn.Linear(num_features, len(values)) for name, values in SHAPE_ATTRIBUTES.items()}
        )
        # torchmetrics reads the feature size from this attribute instead of probing the network.
        self.num_features = num_features
        # Set after training so that the features of real images have a root mean square of 1, the scale KID's
        # polynomial kernel (x . y / d + 1) ** 3 is meant for (raw ReLU features of ~10 would give KIDs of ~1e3).
        self.register_buffer("feature_scale", torch.ones(()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Args:
            images (`torch.Tensor` of shape `(N, 3, H, W)`): Pixels in [0, 1]; other sizes are resized to 32x32.

        Returns:
            `torch.Tensor` of shape `(N, num_features)`: The features.
        """
        return self._embed(images) * self.feature_scale

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        # The features before scaling, which the heads read.
        images = images.float()
        if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            images = nn.functional.interpolate(
                images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False
            )
        return self.trunk(images * 2 - 1)

    def classify(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Args:
            images (`torch.Tensor` of shape `(N, 3, H, W)`): Pixels in [0, 1].

        Returns:
            `dict[str, torch.Tensor]`: Logits `(N, num_values)` per attribute of `SHAPE_ATTRIBUTES`.
        """
        features = self._embed(images)
        return {name: head(features) for name, head in self.heads.items()}


@dataclass(frozen=True)
class ShapesExtractorTrainingConfig:
    """How [`ShapesFeatureExtractor`] is trained (part of its cache key).

    Args:
        num_images (`int`): Fresh renders of all 240 combinations (held-out ones included: the extractor must read
            every image a model draws) to train on.
        epochs (`int`): Passes over them.
        batch_size (`int`): Images per step.
        learning_rate (`float`): Peak AdamW learning rate (one-cycle schedule).
        num_test_images (`int`): Renders of another seed on which the accuracy is reported.
        seed (`int`): Seed of the initialisation and the batch order.
    """

    num_images: int = 4_800
    epochs: int = 3
    batch_size: int = 128
    learning_rate: float = 4e-3
    num_test_images: int = 1_000
    seed: int = 0

    def __post_init__(self) -> None:
        check_training_settings(self)

    @property
    def key(self) -> str:
        """`str`: A file-name-safe summary of the settings."""
        text = f"{self.num_images}-{self.epochs}-{self.batch_size}-{self.learning_rate:g}-{self.num_test_images}"
        return hashlib.sha1(f"{text}-{self.seed}".encode()).hexdigest()[:10]


def render_shapes(num_images: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Renders of all 240 combinations with their attribute indices.

    Args:
        num_images (`int`): How many (combinations and jitters drawn by `data.shapes.sample_specs`).
        seed (`int`): Their seed.

    Returns:
        Images `(num_images, 3, 32, 32)` in [0, 1] and, per attribute of `SHAPE_ATTRIBUTES`, the indices
        `(num_images,)`.
    """
    specs = sample_specs("all", num_images, seed=seed)
    pixels = np.stack([np.asarray(draw_shape(spec, jitter)) for spec, jitter in specs])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    labels = {
        name: torch.tensor([values.index(getattr(spec, name)) for spec, _ in specs])
        for name, values in SHAPE_ATTRIBUTES.items()
    }
    return images, labels


@torch.no_grad()
def shapes_extractor_accuracy(model: ShapesFeatureExtractor, num_images: int = 1_000, seed: int = _TEST_SEED) -> float:
    """Share of fresh renders whose four attributes the extractor's heads all read right.

    Args:
        model (`ShapesFeatureExtractor`): The extractor, in eval mode.
        num_images (`int`, *optional*, defaults to 1000): How many renders.
        seed (`int`, *optional*): Their seed; by default one the extractor never trains on.
    """
    images, labels = render_shapes(num_images, seed)
    logits = model.classify(images)
    right = torch.stack([logits[name].argmax(dim=1) == labels[name] for name in SHAPE_ATTRIBUTES]).all(dim=0)
    return float(right.float().mean())


def train_shapes_feature_extractor(
    config: ShapesExtractorTrainingConfig | None = None,
) -> tuple[ShapesFeatureExtractor, dict[str, float]]:
    """Trains [`ShapesFeatureExtractor`] to read the four attributes of fresh renders (one cross-entropy per head).

    Args:
        config (`ShapesExtractorTrainingConfig`, *optional*): Training settings; the defaults when `None`.

    Returns:
        The extractor (in eval mode) and `attribute_accuracy` (all four right, on renders of another seed),
        `train_seconds` and `num_train_images`.
    """
    config = config or ShapesExtractorTrainingConfig()
    start = time.perf_counter()
    threads = torch.get_num_threads()
    # One intra-op thread: the network is tiny, and on a busy machine more threads spin-wait on each other.
    torch.set_num_threads(1)
    try:
        images, labels = render_shapes(config.num_images, _TRAIN_SEED)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = ShapesFeatureExtractor()
        generator = torch.Generator().manual_seed(config.seed)
        steps_per_epoch = -(-len(images) // config.batch_size)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.learning_rate, total_steps=config.epochs * steps_per_epoch, pct_start=0.2
        )
        model.train()
        for _ in range(config.epochs):
            order = torch.randperm(len(images), generator=generator)
            for step in range(steps_per_epoch):
                batch = order[step * config.batch_size : (step + 1) * config.batch_size]
                logits = model.classify(images[batch])
                loss = sum(nn.functional.cross_entropy(logits[name], labels[name][batch]) for name in logits)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        model.eval()
        with torch.no_grad():
            model.feature_scale.fill_(float(model(images).square().mean().rsqrt()))
        accuracy = shapes_extractor_accuracy(model, config.num_test_images)
    finally:
        torch.set_num_threads(threads)
    metrics = {
        "attribute_accuracy": accuracy,
        "train_seconds": time.perf_counter() - start,
        "num_train_images": float(config.num_images),
    }
    return model, metrics


def shapes_extractor_cache_path(
    cache_dir: str | os.PathLike | None = None, config: ShapesExtractorTrainingConfig | None = None
) -> Path:
    """The file the shapes extractor's weights are cached in: ``{cache_dir}/shapes_features-v{version}-{key}.pt``.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*): Defaults to the judges' `default_cache_dir()`
            (``$TRANSFUSION_HF_CACHE``, else ``~/.cache/transfusion_hf``).
        config (`ShapesExtractorTrainingConfig`, *optional*): Defaults to `ShapesExtractorTrainingConfig()`.
    """
    config = config or ShapesExtractorTrainingConfig()
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return directory / f"shapes_features-v{SHAPES_EXTRACTOR_VERSION}-{config.key}.pt"


def load_shapes_feature_extractor(
    cache_dir: str | os.PathLike | None = None,
    config: ShapesExtractorTrainingConfig | None = None,
    use_cache: bool = True,
) -> ShapesFeatureExtractor:
    """The shapes extractor from the cache, trained (and cached) first when needed.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*): See [`shapes_extractor_cache_path`].
        config (`ShapesExtractorTrainingConfig`, *optional*): Training settings; the defaults when `None`.
        use_cache (`bool`, *optional*, defaults to `True`): Read and write the cache at all.

    Returns:
        `ShapesFeatureExtractor`: In eval mode, gradients off.
    """
    path = shapes_extractor_cache_path(cache_dir, config)
    if use_cache and path.is_file():
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            model = ShapesFeatureExtractor()
            model.load_state_dict(payload["state_dict"])
            return model.eval().requires_grad_(False)
        except Exception as error:  # noqa: BLE001 - any unreadable cache file means the same: train afresh
            logger.warning("ignoring unreadable shapes feature extractor cache %s: %s", path, error)
    logger.info("training the shapes feature extractor (once; cached in %s)", path.parent)
    model, metrics = train_shapes_feature_extractor(config)
    logger.info("shapes feature extractor: %s", metrics)
    if use_cache:
        try:
            _save_atomically({"state_dict": model.state_dict(), "metrics": metrics}, path)
        except OSError as error:
            logger.warning("could not cache the shapes feature extractor at %s: %s", path, error)
    return model.requires_grad_(False)


class _Resized(nn.Module):
    """An exported extractor behind a resize to the image size it was exported for (an exported program accepts
    only that size)."""

    def __init__(self, module: nn.Module, image_size: tuple[int, int], num_features: int) -> None:
        super().__init__()
        self.module = module
        self.image_size = image_size
        self.num_features = num_features

    def train(self, mode: bool = True) -> _Resized:
        # An exported program has no train mode (it raises): it always runs as exported, in eval mode.
        self.training = mode
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float()
        if images.shape[-2:] != self.image_size:
            images = nn.functional.interpolate(images, size=self.image_size, mode="bilinear", antialias=True)
        return self.module(images)


def save_feature_extractor(module: nn.Module, path: str | os.PathLike, image_size: int = 32) -> Path:
    """Export a feature extractor with `torch.export` (any batch size), to pass as `fid_feature_extractor`.

    Args:
        module (`nn.Module`): Maps images `(N, 3, image_size, image_size)` in [0, 1] to features `(N, D)`.
        path (`str` or `os.PathLike`): The file to write (conventionally `.pt2`).
        image_size (`int`, *optional*, defaults to 32): The side the module reads; other sizes are resized to it.

    Returns:
        `pathlib.Path`: The file written.
    """
    module = module.eval()
    example = torch.rand(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, path)
    return path


def load_exported_feature_extractor(path: str | os.PathLike) -> nn.Module:
    """Load a `.pt2` feature extractor (see [`save_feature_extractor`]) and check that it maps images to `(N, D)`.

    Raises:
        ValueError: Naming `fid_feature_extractor` and the file, when it cannot be loaded or does not give features.
    """
    try:
        program = torch.export.load(path)
    except Exception as error:  # noqa: BLE001 - torch.export raises many types for a file it cannot read
        raise ValueError(
            f"`fid_feature_extractor`={str(path)!r} is not a module saved with torch.export "
            f"(transfusion_hf.evaluation.save_feature_extractor): {type(error).__name__}: {error}"
        ) from error
    placeholders = [node for node in program.graph.nodes if node.op == "placeholder"]
    user_inputs = set(program.graph_signature.user_inputs)
    shapes = [node.meta["val"].shape for node in placeholders if node.name in user_inputs and "val" in node.meta]
    if len(shapes) != 1 or len(shapes[0]) != 4 or int(shapes[0][1]) != 3:
        raise ValueError(
            f"`fid_feature_extractor`={str(path)!r} must take one input, images (N, 3, H, W); its inputs have shapes "
            f"{[tuple(shape) for shape in shapes]}."
        )
    image_size = (int(shapes[0][2]), int(shapes[0][3]))
    module = program.module()
    with torch.no_grad():
        features = module(torch.rand(2, 3, *image_size))
    if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[0] != 2:
        got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"`fid_feature_extractor`={str(path)!r} must return features (N, D), got {got} for N=2.")
    return _Resized(module, image_size, int(features.shape[1])).eval()


def load_feature_extractor(name_or_path: str | nn.Module) -> int | nn.Module:
    """What torchmetrics' FID and KID take as `feature` for `fid_feature_extractor`.

    Args:
        name_or_path (`str` or `nn.Module`): `"inception"` (torchmetrics' standard: returns 2048, the feature layer it
            loads itself), `"shapes"` ([`load_shapes_feature_extractor`]), a `.pt2` file
            ([`load_exported_feature_extractor`]), or a module (images `(N, 3, H, W)` in [0, 1] -> `(N, D)`).

    Raises:
        ValueError: Naming `fid_feature_extractor`, for a file that does not exist or cannot be read.
    """
    if isinstance(name_or_path, nn.Module):
        return name_or_path.eval()
    if name_or_path == STANDARD_FEATURE_EXTRACTOR:
        return 2048
    if name_or_path == SHAPES_FEATURE_EXTRACTOR:
        return load_shapes_feature_extractor()
    if not os.path.isfile(name_or_path):
        raise ValueError(
            f"`fid_feature_extractor`={name_or_path!r} is neither {STANDARD_FEATURE_EXTRACTOR!r}, "
            f"{SHAPES_FEATURE_EXTRACTOR!r} nor an existing file saved with torch.export (save_feature_extractor)."
        )
    return load_exported_feature_extractor(name_or_path)


__all__ = [
    "SHAPES_FEATURE_EXTRACTOR",
    "SHAPE_ATTRIBUTES",
    "STANDARD_FEATURE_EXTRACTOR",
    "ShapesExtractorTrainingConfig",
    "ShapesFeatureExtractor",
    "load_exported_feature_extractor",
    "load_feature_extractor",
    "load_shapes_feature_extractor",
    "render_shapes",
    "save_feature_extractor",
    "shapes_extractor_accuracy",
    "train_shapes_feature_extractor",
]
