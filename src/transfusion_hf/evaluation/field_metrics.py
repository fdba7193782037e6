"""The field's metrics for a text-to-image and captioning model, through maintained libraries (none is written here):

- `fid`, `kid`: Fréchet and kernel inception distance of generated vs real images (torchmetrics'
  `FrechetInceptionDistance` and `KernelInceptionDistance`), on the features of `fid_feature_extractor`
  (`evaluation.feature_extractors`: the standard InceptionV3, the shapes CNN trained here, or a module of your own).
- `clip`: CLIP score of each generated image against its prompt (torchmetrics' `CLIPScore`, 100 x cosine), with the
  CLIP of `clip_model` (a Hub id or a local folder); also reported for the real images and their captions, the
  score a perfect model would get.
- `caption`: BLEU-1..4 and CIDEr-D of generated captions against the references (`pycocoevalcap`'s `Bleu` and
  `Cider`, the COCO caption evaluation code, pure Python). Captions are lower-cased and split on non-alphanumerics,
  in place of COCO's Java PTB tokenizer.
- `perplexity`: of the model's LM on held-out text (torchmetrics' `Perplexity` over its next-token logits): exp of
  its mean next-token loss per predicted token.

[`FieldMetrics`] loads what the chosen metrics need once (checking every argument first) and scores images and
captions; [`evaluate_pipeline`] runs a [`TransfusionPipeline`] on captioned real images and returns every score.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import torch
from torch import nn

from ..processing_transfusion import pad_sequences
from .batched import caption_images, generate_images
from .feature_extractors import STANDARD_FEATURE_EXTRACTOR, load_feature_extractor

FIELD_METRICS: tuple[str, ...] = ("fid", "kid", "clip", "caption", "perplexity")
"""The metric names a caller picks from (`metrics=`, `--metrics`, `--validation_metrics`)."""

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
"""The CLIP of `clip` by default (a download)."""

KID_SUBSET_SIZE = 1000
"""Images per KID subset (the field's choice); sets of fewer than 2000 images use subsets of half their size."""

KID_SUBSETS = 100
"""Random subsets KID averages over (the field's choice)."""

# What each score means, for the markdown table.
DESCRIPTIONS: dict[str, str] = {
    "fid": "Fréchet distance of generated vs real image features (lower is better; 0: same distribution)",
    "kid_mean": "kernel (polynomial MMD) distance of the same features, unbiased for small sets (lower is better)",
    "kid_std": "spread of KID over its random subsets",
    "clip_score": "CLIP score of generated images vs their prompts (100 x cosine; higher is better)",
    "clip_score_real": "CLIP score of the real images vs their captions (what a perfect model would get)",
    "bleu_1": "BLEU-1 of generated captions vs the references (0-1)",
    "bleu_2": "BLEU-2 (0-1)",
    "bleu_3": "BLEU-3 (0-1)",
    "bleu_4": "BLEU-4 (0-1; needs captions of 4+ words)",
    "cider": "CIDEr-D of generated captions (0-10; IDF from the references, so it needs varied references)",
    "perplexity": "perplexity of the LM on the held-out captions as text (exp of its mean token loss; lower: better)",
    "lm_loss": "mean next-token loss on the held-out captions (nats per token)",
}


def parse_metric_names(value: str | Sequence[str], argument: str = "metrics") -> tuple[str, ...]:
    """A comma list (or sequence) of metric names, checked against `FIELD_METRICS`, duplicates dropped.

    Args:
        value (`str` or `Sequence[str]`): e.g. `"fid,clip,caption"`; empty gives `()`.
        argument (`str`): the argument's name for the error message (e.g. `"--validation_metrics"`).

    Raises:
        ValueError: naming `argument` and the unknown name.
    """
    names = [name.strip().lower() for name in (value.split(",") if isinstance(value, str) else value)]
    names = [name for name in names if name]
    unknown = [name for name in names if name not in FIELD_METRICS]
    if unknown:
        raise ValueError(f"{argument}={unknown[0]!r} is not a metric; choose from {list(FIELD_METRICS)}.")
    return tuple(dict.fromkeys(names))


def images_to_tensor(images: Sequence[PIL.Image.Image] | torch.Tensor) -> torch.Tensor:
    """Images as one float tensor in [0, 1].

    Args:
        images (`Sequence[PIL.Image.Image]` or `torch.Tensor`): PIL images of one size (any mode, made RGB), or
            a `(N, 3, H, W)` tensor: uint8 in [0, 255] or float in [0, 1].

    Returns:
        `torch.Tensor` of shape `(N, 3, H, W)`, float32 in [0, 1].
    """
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}.")
        return images.float() / 255 if images.dtype == torch.uint8 else images.float()
    if len(images) == 0:
        raise ValueError("images is empty.")
    sizes = {image.size for image in images}
    if len(sizes) != 1:
        raise ValueError(f"images must share one size, got {sorted(sizes)}.")
    pixels = np.stack([np.asarray(image.convert("RGB")) for image in images])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255


class _CLIPFeatures(nn.Module):
    """transformers' `CLIPModel` as torchmetrics' `CLIPScore` calls it: its `get_image_features` and
    `get_text_features` return the projected embeddings as tensors (transformers 5 returns a `ModelOutput` whose
    `pooler_output` holds them, which torchmetrics 1.9 cannot read)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _embeddings(output) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._embeddings(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._embeddings(self.model.get_text_features(*args, **kwargs))


def load_clip_score(clip_model: str = DEFAULT_CLIP_MODEL):
    """torchmetrics' `CLIPScore` with the CLIP of `clip_model` (`transformers.CLIPModel` and `CLIPProcessor`).

    Args:
        clip_model (`str`): a Hub id (downloaded) or a local folder holding both (`save_pretrained`).

    Raises:
        ValueError: naming `clip_model` and what to pass instead, when the weights cannot be loaded (offline, say).
    """
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(clip_model).eval()
        processor = CLIPProcessor.from_pretrained(clip_model)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"`clip_model`={clip_model!r} cannot be loaded: {reason} Pass --clip_model PATH, a local folder with a "
            "transformers CLIPModel and its CLIPProcessor (save_pretrained), or leave 'clip' out of the metrics."
        ) from error
    # A callable is torchmetrics' way to take a model that is not one of its listed Hub ids (a local folder).
    return CLIPScore(model_name_or_path=lambda: (_CLIPFeatures(model), processor))


def load_image_distances(fid_feature_extractor: str | nn.Module = STANDARD_FEATURE_EXTRACTOR):
    """torchmetrics' `FrechetInceptionDistance` and `KernelInceptionDistance` on the features of
    `fid_feature_extractor` (see `evaluation.feature_extractors.load_feature_extractor`), taking images in [0, 1].

    Raises:
        ValueError: naming `fid_feature_extractor` and what to pass instead, when the standard InceptionV3 cannot be
            loaded (torch-fidelity missing, or its weights not downloadable) or a file is not an extractor.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    feature = load_feature_extractor(fid_feature_extractor)
    try:
        fid = FrechetInceptionDistance(feature=feature, normalize=True)
        with warnings.catch_warnings():  # KID keeps every feature, which it warns about: the sets here are small
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            kid = KernelInceptionDistance(
                feature=fid.inception if isinstance(feature, nn.Module) else feature,
                subsets=KID_SUBSETS,
                subset_size=KID_SUBSET_SIZE,
                normalize=True,
            )
    except (ImportError, OSError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if isinstance(feature, nn.Module):
            # torchmetrics probed a module without `num_features` with a (1, 3, 299, 299) image, which it refused.
            raise ValueError(
                f"`fid_feature_extractor` {type(feature).__name__} failed on torchmetrics' probe image: {reason} Give "
                "it a `num_features` attribute (its feature size) or save it with save_feature_extractor."
            ) from error
        raise ValueError(
            f"`fid_feature_extractor`={fid_feature_extractor!r} (torchmetrics' standard InceptionV3) cannot be "
            f"loaded: {reason} Pass --fid_feature_extractor shapes (a CNN trained here on the built-in shapes) or "
            "--fid_feature_extractor PATH, a feature extractor saved with "
            "transfusion_hf.evaluation.save_feature_extractor (torch.export, .pt2); or install torch-fidelity and "
            "allow the download."
        ) from error
    return fid, kid


def caption_scores(predicted: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """BLEU-1..4 and CIDEr-D of generated captions against references, with the COCO caption evaluation code.

    Args:
        predicted (`Sequence[str]`): One generated caption per image.
        references (`Sequence[str | Sequence[str]]`): One reference (or several) per image.

    Returns:
        `dict[str, float]`: `bleu_1` ... `bleu_4` (corpus level, 0-1) and `cider` (0-10: identical captions of four
        words or more score 10; its IDF comes from the references, so a single image, or one caption for all, scores
        0), `num_captions`.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(predicted) != len(references) or not predicted:
        raise ValueError(f"need one reference per caption and at least one: {len(predicted)} and {len(references)}.")
    references = [[reference] if isinstance(reference, str) else list(reference) for reference in references]
    ground_truth = {index: [_coco_tokens(text) for text in group] for index, group in enumerate(references)}
    results = {index: [_coco_tokens(text)] for index, text in enumerate(predicted)}
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its n-gram counts
        bleu, _ = Bleu(4).compute_score(ground_truth, results)
        cider, _ = Cider().compute_score(ground_truth, results)
    scores = {f"bleu_{n + 1}": float(value) for n, value in enumerate(bleu)}
    return {**scores, "cider": float(cider), "num_captions": len(predicted)}


def _coco_tokens(text: str) -> str:
    # Lower-case words and numbers, punctuation dropped: what COCO's PTB tokenizer leaves of a plain caption.
    return " ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower()))


@torch.no_grad()
def text_perplexity(model: nn.Module, processor, texts: Sequence[str], batch_size: int = 32) -> dict[str, float]:
    """Perplexity of the model's LM on texts, each as a text-only sequence `[bos] text`: torchmetrics' `Perplexity`
    over the next-token logits of every text token. The end is not scored: a model trained on captioned images alone
    ends a caption with `<boi>`, one trained on text data too with eos (measured on the shapes demo: the eos after a
    caption costs it 15 nats, more than the whole caption), and the caption's own tokens are what both learnt.

    Args:
        model (`TransfusionForMixedModal`): the model (its forward gives `logits`).
        processor (`TransfusionProcessor`): lays out the sequences.
        texts (`Sequence[str]`): the held-out texts; longer than the context, they are cut to it.
        batch_size (`int`): sequences per forward.

    Returns:
        `dict[str, float]`: `perplexity`, `lm_loss` (its log: the mean loss per predicted token) and
        `num_text_tokens` (predicted tokens).
    """
    from torchmetrics.text import Perplexity

    if not texts:
        raise ValueError("texts is empty.")
    context = getattr(model.config.text_config, "max_position_embeddings", None)
    device = next(model.parameters()).device
    metric = Perplexity(ignore_index=-100).to(device)
    was_training = model.training
    model.eval()
    tokens = 0
    for start in range(0, len(texts), batch_size):
        sequences = [
            processor.encode_parts([text], add_bos=True)[:context] for text in texts[start : start + batch_size]
        ]
        input_ids, attention_mask = pad_sequences(sequences, processor.tokenizer.pad_token_id, "right")
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        # Position i predicts token i + 1; padding predicts nothing.
        targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
        metric.update(logits[:, :-1].float(), targets)
        tokens += int((targets != -100).sum())
    model.train(was_training)
    perplexity = float(metric.compute())
    return {"perplexity": perplexity, "lm_loss": float(np.log(perplexity)), "num_text_tokens": tokens}


class FieldMetrics:
    """The models behind the chosen metrics, loaded once; every argument is checked here, before any data.

    Args:
        metrics (`str` or `Sequence[str]`): names of `FIELD_METRICS` (a comma list works).
        fid_feature_extractor (`str` or `nn.Module`): for `fid` and `kid`: `"inception"` (the standard, a download),
            `"shapes"`, a `.pt2` file or a module (see `evaluation.feature_extractors`).
        clip_model (`str`): for `clip`: a Hub id or a local folder with a `CLIPModel` and its `CLIPProcessor`.
        device (`str` or `torch.device`): where the feature networks run.

    Raises:
        ValueError: naming the argument (and the flag to pass instead, for a missing default weight).
    """

    def __init__(
        self,
        metrics: str | Sequence[str] = FIELD_METRICS,
        fid_feature_extractor: str | nn.Module = STANDARD_FEATURE_EXTRACTOR,
        clip_model: str = DEFAULT_CLIP_MODEL,
        device: str | torch.device = "cpu",
    ) -> None:
        self.metrics = parse_metric_names(metrics)
        if not self.metrics:
            raise ValueError(f"`metrics` is empty; choose from {list(FIELD_METRICS)}.")
        for package, needed_by in (("torchmetrics", self.metrics), ("pycocoevalcap", ("caption",))):
            wanted = [name for name in self.metrics if name in needed_by]
            if wanted and importlib.util.find_spec(package) is None:
                raise ValueError(
                    f"`metrics` {wanted} need the package {package}: pip install 'transfusion-hf[eval]' (or {package})"
                )
        self.device = torch.device(device)
        self.fid = self.kid = self.clip = None
        if "fid" in self.metrics or "kid" in self.metrics:
            self.fid, self.kid = (metric.to(self.device) for metric in load_image_distances(fid_feature_extractor))
        if "clip" in self.metrics:
            self.clip = load_clip_score(clip_model).to(self.device)

    @property
    def needs_generated_images(self) -> bool:
        """Whether a metric scores generated images (`fid`, `kid`, `clip`)."""
        return any(name in self.metrics for name in ("fid", "kid", "clip"))

    @torch.no_grad()
    def image_scores(
        self, real: Sequence[PIL.Image.Image] | torch.Tensor, generated: Sequence[PIL.Image.Image] | torch.Tensor
    ) -> dict[str, float]:
        """FID (`fid`) and KID (`kid_mean`, `kid_std`) of generated vs real images, for those of the chosen metrics.

        Args:
            real, generated: images (see [`images_to_tensor`]), at least two of each; the two sets may differ in size
                and count.
        """
        real, generated = images_to_tensor(real).to(self.device), images_to_tensor(generated).to(self.device)
        if min(len(real), len(generated)) < 2:
            raise ValueError(f"FID and KID need at least 2 images of each set, got {len(real)} and {len(generated)}.")
        scores: dict[str, float] = {}
        for metric, wanted in ((self.fid, "fid" in self.metrics), (self.kid, "kid" in self.metrics)):
            if not wanted:
                continue
            metric.reset()
            metric.update(real, real=True)
            metric.update(generated, real=False)
            if metric is self.fid:
                scores["fid"] = float(metric.compute())
                continue
            # Subsets of half the smaller set (the field's 1000 at most), so that their spread, kid_std, is telling.
            metric.subset_size = max(2, min(KID_SUBSET_SIZE, len(real) // 2, len(generated) // 2))
            with torch.random.fork_rng(devices=[]):  # KID draws its subsets from torch's global generator
                torch.manual_seed(0)
                mean, std = metric.compute()
            scores.update(kid_mean=float(mean), kid_std=float(std))
        return scores

    @torch.no_grad()
    def clip_scores(
        self, images: Sequence[PIL.Image.Image] | torch.Tensor, texts: Sequence[str], batch_size: int = 64
    ) -> float:
        """CLIP score of images against their texts (mean of 100 x cosine over the images, floored at 0)."""
        if self.clip is None:
            raise ValueError(f"`clip` is not among the metrics {list(self.metrics)}.")
        pixels = (images_to_tensor(images) * 255).round().to(torch.uint8)
        if len(pixels) != len(texts):
            raise ValueError(f"{len(pixels)} images for {len(texts)} texts.")
        self.clip.reset()
        for start in range(0, len(texts), batch_size):
            self.clip.update(
                list(pixels[start : start + batch_size].to(self.device)), list(texts[start : start + batch_size])
            )
        return float(self.clip.compute())


@functools.lru_cache(maxsize=2)
def cached_field_metrics(
    metrics: tuple[str, ...],
    fid_feature_extractor: str = STANDARD_FEATURE_EXTRACTOR,
    clip_model: str = DEFAULT_CLIP_MODEL,
) -> FieldMetrics:
    """[`FieldMetrics`] on the CPU, loaded once per process for the same arguments: the training script checks its
    flags with it before loading data, and its validation reuses what was loaded.

    Args:
        metrics (`tuple[str, ...]`): names of `FIELD_METRICS` (see [`parse_metric_names`]).
        fid_feature_extractor, clip_model (`str`): see [`FieldMetrics`].
    """
    return FieldMetrics(metrics, fid_feature_extractor, clip_model)


@dataclass
class FieldEvaluation:
    """What [`evaluate_pipeline`] measured, and the material behind it.

    Args:
        metrics (`dict`): the scores (keys of `DESCRIPTIONS`), counts and `seconds`.
        prompts (`list[str]`): the reference captions, used as prompts.
        images (`list[PIL.Image.Image]`): one generated image per prompt (empty without `fid`, `kid`, `clip`).
        real_images (`list[PIL.Image.Image]`): the real images.
        predicted_captions (`list[str]`): one generated caption per real image (empty without `caption`).
    """

    metrics: dict
    prompts: list[str] = field(default_factory=list)
    images: list[PIL.Image.Image] = field(default_factory=list)
    real_images: list[PIL.Image.Image] = field(default_factory=list)
    predicted_captions: list[str] = field(default_factory=list)


@torch.no_grad()
def evaluate_pipeline(
    pipeline,
    captions: Sequence[str],
    real_images: Sequence[PIL.Image.Image],
    field_metrics: FieldMetrics,
    num_inference_steps: int = 25,
    guidance_scale: float = 3.0,
    batch_size: int = 32,
    max_new_tokens: int = 32,
    seed: int = 0,
) -> FieldEvaluation:
    """Score a [`TransfusionPipeline`] on captioned real images: one image generated per caption (FID, KID against
    the real images; CLIP score against the caption), one caption generated per real image (BLEU, CIDEr against its
    caption), and the LM's perplexity on the captions as text.

    Args:
        pipeline (`TransfusionPipeline`): the model.
        captions (`Sequence[str]`): the real images' captions (prompts and references).
        real_images (`Sequence[PIL.Image.Image]`): held-out real images, at the pipeline's `image_size`.
        field_metrics (`FieldMetrics`): the chosen metrics, loaded.
        num_inference_steps, guidance_scale: sampling settings.
        batch_size (`int`): prompts or images per pipeline call.
        max_new_tokens (`int`): longest generated caption, in tokens.
        seed (`int`): the sampling seed.
    """
    if len(captions) != len(real_images) or not captions:
        raise ValueError(f"need one caption per real image and at least one: {len(captions)} and {len(real_images)}.")
    captions, real_images = list(captions), list(real_images)
    chosen, started = field_metrics.metrics, time.perf_counter()
    images, predicted = [], []
    metrics: dict = {"num_real_images": len(real_images)}
    if field_metrics.needs_generated_images:
        generator = torch.Generator().manual_seed(seed)
        images = generate_images(pipeline, captions, batch_size, num_inference_steps, guidance_scale, generator)
        metrics["num_generated_images"] = len(images)
    if "fid" in chosen or "kid" in chosen:
        metrics.update(field_metrics.image_scores(real_images, images))
    if "clip" in chosen:
        metrics["clip_score"] = field_metrics.clip_scores(images, captions)
        metrics["clip_score_real"] = field_metrics.clip_scores(real_images, captions)
    if "caption" in chosen:
        predicted = caption_images(pipeline, real_images, batch_size, max_new_tokens)
        metrics.update(caption_scores(predicted, captions))
    if "perplexity" in chosen:
        metrics.update(text_perplexity(pipeline.transformer, pipeline.processor, captions, batch_size))
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    return FieldEvaluation(metrics, captions, images, real_images, predicted)


def metrics_table(metrics: dict, title: str | None = None) -> str:
    """The scores as a markdown table (metric, value, what it measures); counts and timings go under it.

    Args:
        metrics (`dict`): as [`FieldEvaluation.metrics`].
        title (`str`, *optional*): a heading line above the table.
    """
    lines = [f"## {title}", ""] if title else []
    lines += ["| metric | value | what it measures |", "| --- | ---: | --- |"]
    for name, description in DESCRIPTIONS.items():
        if name in metrics:
            lines.append(f"| {name} | {metrics[name]:.4g} | {description} |")
    others = [f"{name}={value}" for name, value in metrics.items() if name not in DESCRIPTIONS]
    if others:
        lines += ["", ", ".join(others)]
    return "\n".join(lines) + "\n"


__all__ = [
    "DEFAULT_CLIP_MODEL",
    "DESCRIPTIONS",
    "FIELD_METRICS",
    "FieldEvaluation",
    "FieldMetrics",
    "cached_field_metrics",
    "caption_scores",
    "evaluate_pipeline",
    "images_to_tensor",
    "load_clip_score",
    "load_image_distances",
    "metrics_table",
    "parse_metric_names",
    "text_perplexity",
]
