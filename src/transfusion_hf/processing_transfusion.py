"""TransfusionProcessor: the tokenizer and the image layout.

One processor serves training and inference, so a sequence is laid out the same way everywhere:
`[bos] text <boi> <image>*N <eoi> text ... [eos]`. The training collator, which also noises the images, is
`transfusion_hf.data.collator.TransfusionDataCollator`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor
from transformers import BatchFeature, ProcessorMixin

ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor
# The image layout's special tokens: `<boi> <image>*N <eoi>`.
BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN = "<boi>", "<eoi>", "<image>"
IMAGE_SPECIAL_TOKENS = (BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN)


class TransfusionProcessor(ProcessorMixin):
    """Tokenizer plus image handling for Transfusion.

    Text may hold the `image_token` string (default `"<image>"`) once per image; each is expanded into
    `<boi> <image>*num_image_tokens <eoi>`. Images (PIL of any mode, numpy `(H, W, C)` in [0, 1] or uint8, tensors
    `(C, H, W)` in [-1, 1]/[0, 1]) are converted to RGB, resized (and center-cropped) to `image_size` and returned as
    `pixel_values` in [-1, 1].

    Args:
        tokenizer: any transformers tokenizer; the three special tokens (and a pad token) are added when missing.
        image_size (`int`, defaults to 32): pixel side of the images fed to the VAE (or the model, in pixel space).
        num_image_tokens (`int`, defaults to 16): placeholders per image, `config.num_patches` of the model.
        resize_mode (`str`, defaults to `"crop"`): diffusers' `VaeImageProcessor` mode: `"crop"` keeps the aspect
            ratio and center-crops, `"default"` stretches, `"fill"` pads.
        boi_token, eoi_token, image_token (`str`): the special token strings.
    """

    attributes = ["tokenizer"]
    tokenizer_class = "AutoTokenizer"

    def __init__(
        self,
        tokenizer=None,
        image_size: int = 32,
        num_image_tokens: int = 16,
        resize_mode: str = "crop",
        boi_token: str = BOI_TOKEN,
        eoi_token: str = EOI_TOKEN,
        image_token: str = IMAGE_TOKEN,
        chat_template: str | None = None,
        **kwargs,
    ):
        if resize_mode not in ("default", "fill", "crop"):
            raise ValueError(f"`resize_mode` must be 'default', 'fill' or 'crop', got {resize_mode!r}.")
        for name, value in (("image_size", image_size), ("num_image_tokens", num_image_tokens)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        self.image_size = image_size
        self.num_image_tokens = num_image_tokens
        self.resize_mode = resize_mode
        self.boi_token, self.eoi_token, self.image_token = boi_token, eoi_token, image_token
        super().__init__(tokenizer, chat_template=chat_template)
        add_special_tokens(tokenizer, (boi_token, eoi_token, image_token))

    # ----------------------------------------------------------------------------------------------- tokens
    @property
    def boi_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.boi_token)

    @property
    def eoi_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.eoi_token)

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    @property
    def patch_pixels(self) -> int:
        """Pixel side of the square each placeholder stands for: `image_size` over the placeholders per side."""
        side = math.isqrt(self.num_image_tokens)
        if side * side != self.num_image_tokens or self.image_size % side:
            raise ValueError(
                f"`num_image_tokens`={self.num_image_tokens} is not a square grid over `image_size`={self.image_size}: "
                "images of other sizes need it."
            )
        return self.image_size // side

    def num_tokens_for(self, height: int, width: int) -> int:
        """Placeholders of an image of `height x width` pixels (each side a multiple of `patch_pixels`)."""
        patch = self.patch_pixels
        if height % patch or width % patch or height <= 0 or width <= 0:
            raise ValueError(
                f"`height`={height} and `width`={width}: an image is not a whole number of patches of {patch}x{patch} "
                "pixels (`height` and `width` must be multiples of the patch size times the VAE's scale)."
            )
        return (height // patch) * (width // patch)

    def image_block(self, num_tokens: int | None = None) -> list[int]:
        """`<boi> <image>*N <eoi>` ids of one image: N = `num_tokens`, default `num_image_tokens` (the default
        size)."""
        num_tokens = self.num_image_tokens if num_tokens is None else num_tokens
        return [self.boi_token_id] + [self.image_token_id] * num_tokens + [self.eoi_token_id]

    def encode_text(self, text: str) -> list[int]:
        """Ids of plain text (no special tokens added)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def encode_parts(
        self, parts: Sequence[str | Sequence[int] | int | None], add_bos: bool = True, add_eos: bool = False
    ) -> list[int]:
        """Lay out a sequence of text parts and images.

        Args:
            parts (`Sequence[str | Sequence[int] | int | None]`): text strings (or their ids, already encoded), and
                `None` where an image of the default size goes, or its number of placeholders (an `int`) for an
                image of another size ([`num_tokens_for`]).
            add_bos (`bool`): start with the tokenizer's BOS token, when it has one.
            add_eos (`bool`): end with its EOS token (training sequences end there).

        Returns:
            `list[int]`: the ids.
        """
        ids: list[int] = []
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        if add_bos and bos is not None:
            ids.append(bos)
        for part in parts:
            if part is None or isinstance(part, int):
                ids.extend(self.image_block(part))
            else:
                ids.extend(self.encode_text(part) if isinstance(part, str) else part)
        if add_eos and eos is not None:
            ids.append(eos)
        return ids

    def split_text(self, text: str) -> list[str | None]:
        """Split text at its image markers into the parts [`encode_parts`] takes."""
        pieces = text.split(self.image_token)
        parts: list[str | None] = []
        for index, piece in enumerate(pieces):
            if index:
                parts.append(None)
            if piece.strip():
                parts.append(piece.strip())
        return parts

    # ----------------------------------------------------------------------------------------------- images
    def preprocess_images(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """Convert images to `pixel_values` of shape `(num_images, 3, image_size, image_size)` in [-1, 1]."""
        return images_to_pixel_values(images, self.image_size, self.resize_mode)

    # ------------------------------------------------------------------------------------------------- call
    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: ImageInput | Sequence[ImageInput] | Sequence[Sequence[ImageInput]] | None = None,
        padding_side: str = "right",
        add_eos: bool = False,
        return_tensors: str = "pt",
        height: int | None = None,
        width: int | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Tokenize a batch of texts with image markers and preprocess its images: everything the model's forward
        takes, in pixel space.

        A pixel-space model (no VAE) takes the output as it is: `model(**processor(text=..., images=...))`. A model
        on VAE latents takes `latents` made from `pixel_values` by the VAE (see the README, "Use it").

        Args:
            text (`str` or `list[str]`): each `image_token` marks where an image goes.
            images: one image per marker (PIL, numpy or torch, see [`images_to_pixel_values`]), flat in reading
                order, or one list per text.
            padding_side (`str`): `"right"` for training, `"left"` for generation.
            add_eos (`bool`): end every sequence with EOS.
            height, width (`int`, *optional*): the pixel size every image is resized (and center-cropped) to, any
                aspect ratio the model takes (`max_latent_size`); default `image_size` square. Each image then takes
                [`num_tokens_for`] placeholders.

        Returns:
            `BatchFeature` with `input_ids` and `attention_mask` `(batch_size, sequence_length)` and, when there are
            images, `pixel_values` `(num_images, 3, height, width)` in [-1, 1] and `timesteps`
            `(num_images,)` of zeros: the images enter as clean context (for training, replace images and
            timesteps by noised ones, see [`TransfusionNoiser`]).
        """
        texts = [text] if isinstance(text, str) else list(text or [""])
        for index, item in enumerate(texts):
            if not isinstance(item, str):
                raise ValueError(f"`text` must be a string or a list of strings, got text[{index}]={item!r}.")
        flat_images = flatten_images(images)
        self._check_image_counts(texts, images, flat_images)
        size = (height or self.image_size, width or self.image_size)
        image_part = None if size == (self.image_size, self.image_size) else self.num_tokens_for(*size)
        sequences = [
            self.encode_parts(
                [image_part if part is None else part for part in self.split_text(item)], add_eos=add_eos
            )
            for item in texts
        ]
        input_ids, attention_mask = pad_sequences(sequences, self.tokenizer.pad_token_id, padding_side)
        data = {"input_ids": input_ids, "attention_mask": attention_mask}
        if flat_images:
            data["pixel_values"] = images_to_pixel_values(flat_images, size, self.resize_mode)
            data["timesteps"] = torch.zeros(len(flat_images))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _check_image_counts(self, texts: list[str], images, flat_images: list) -> None:
        """One image per marker, in total and, for images given as one list per text, text by text."""
        markers = [item.count(self.image_token) for item in texts]
        if sum(markers) != len(flat_images):
            raise ValueError(
                f"`text` holds {sum(markers)} image markers ({self.image_token!r}) but {len(flat_images)} images "
                "were given: put one marker where each image goes."
            )
        nested = isinstance(images, (list, tuple)) and any(isinstance(item, (list, tuple)) for item in images)
        if not nested:
            return
        if len(images) != len(texts):
            raise ValueError(f"`images` holds {len(images)} lists (one per text) but {len(texts)} texts were given.")
        for index, (count, row_images) in enumerate(zip(markers, images)):
            row_count = len(row_images) if isinstance(row_images, (list, tuple)) else 1
            if row_count != count:
                raise ValueError(
                    f"text[{index}] holds {count} image markers ({self.image_token!r}) but images[{index}] has "
                    f"{row_count} images."
                )

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        """Decode generated ids; image blocks and special tokens are dropped by default."""
        return [
            text.strip()
            for text in self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)
        ]

    def decode(self, token_ids, skip_special_tokens: bool = True, **kwargs) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs).strip()


def images_to_pixel_values(
    images: ImageInput | Sequence[ImageInput], image_size: int | tuple[int, int], resize_mode: str = "crop"
) -> torch.Tensor:
    """Convert images to `(num_images, 3, height, width)` pixel values in [-1, 1].

    Args:
        images: PIL images of any mode, numpy arrays `(H, W)` or `(H, W, C)` (uint8, or floats in [0, 1]), or tensors
            `(C, H, W)` in [-1, 1] or [0, 1].
        image_size (`int` or `tuple[int, int]`): output side, or `(height, width)`.
        resize_mode (`str`): diffusers' `VaeImageProcessor` resize mode (`"crop"` keeps the aspect ratio).
    """
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4:
        images = list(images)  # a batch (B, C, H, W) tensor / (B, H, W, C) array is B images, not one.
    if not isinstance(images, (list, tuple)):
        images = [images]
    converted = []
    for index, image in enumerate(images):
        if isinstance(image, torch.Tensor):
            if image.dim() != 3:
                raise ValueError(f"images[{index}] is a tensor of shape {tuple(image.shape)}, expected (C, H, W).")
            image = image.detach().float().cpu()
            image = (image + 1) / 2 if image.min() < 0 else image  # [-1, 1] -> [0, 1]
            image = image.expand(3, -1, -1) if image.shape[0] == 1 else image[:3]
            image = image.permute(1, 2, 0).clamp(0, 1).numpy()
        if isinstance(image, np.ndarray):
            if image.ndim == 3 and image.shape[-1] == 1:
                image = image[..., 0]  # PIL cannot build an image from (H, W, 1); treat it as grayscale.
            if image.ndim == 2:
                image = np.repeat(image[..., None], 3, axis=-1)
            if image.dtype != np.uint8:
                image = (image.clip(0, 1) * 255).round().astype(np.uint8)
            image = PIL.Image.fromarray(image)
        if not isinstance(image, PIL.Image.Image):
            raise ValueError(f"images[{index}] has type {type(image).__name__}; expected PIL, numpy or torch.")
        converted.append(image.convert("RGB"))
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    processor = VaeImageProcessor(vae_scale_factor=1, do_resize=True, do_normalize=True)
    return processor.preprocess(converted, height=height, width=width, resize_mode=resize_mode)


def add_special_tokens(tokenizer, tokens: Sequence[str] = IMAGE_SPECIAL_TOKENS) -> int:
    """Add the image special tokens, and a pad token, to a tokenizer that lacks them; returns how many were added.

    Resize the model's embeddings to `len(tokenizer)` afterwards.

    Args:
        tokenizer: a transformers tokenizer (changed in place).
        tokens (`Sequence[str]`, defaults to `("<boi>", "<eoi>", "<image>")`): the image special tokens.
    """
    missing = [token for token in tokens if token not in tokenizer.get_vocab()]
    added = tokenizer.add_special_tokens({"additional_special_tokens": missing}) if missing else 0
    if tokenizer.pad_token is None:
        added += tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return added


def special_token_ids(
    tokenizer, boi_token: str = BOI_TOKEN, eoi_token: str = EOI_TOKEN, image_token: str = IMAGE_TOKEN
) -> dict[str, int]:
    """The ids of the image special tokens, keyed by the [`TransfusionConfig`] fields that hold them, so a config
    is built with `TransfusionConfig(..., **special_token_ids(tokenizer))`.

    Args:
        tokenizer: a transformers tokenizer holding the tokens (`train_bpe_tokenizer`, or any tokenizer after
            [`add_special_tokens`]).
        boi_token, eoi_token, image_token (`str`): the token strings, as in [`TransfusionProcessor`].

    Returns:
        `dict[str, int]`: `{"boi_token_id": ..., "eoi_token_id": ..., "image_token_id": ...}`.
    """
    ids = {}
    for field, token in (("boi_token_id", boi_token), ("eoi_token_id", eoi_token), ("image_token_id", image_token)):
        token_id = tokenizer.convert_tokens_to_ids(token)
        # A missing token maps to the unknown token's id (or None where there is none), never to an error.
        if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
            raise ValueError(
                f"The tokenizer has no {token!r} token (for `{field}`): add it with "
                "`transfusion_hf.processing_transfusion.add_special_tokens(tokenizer)`."
            )
        ids[field] = token_id
    return ids


def flatten_images(images) -> list:
    if images is None:
        return []
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4:
        return list(images)  # a batch tensor/array holds one image per marker.
    if not isinstance(images, (list, tuple)):
        return [images]
    flat = []
    for item in images:
        flat.extend(item if isinstance(item, (list, tuple)) else [item])
    return flat


def pad_sequences(
    sequences: Sequence[Sequence[int]], pad_token_id: int, padding_side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id lists into `(batch_size, max_length)` ids and attention mask."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"`padding_side` must be 'left' or 'right', got {padding_side!r}.")
    length = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        span = slice(length - len(sequence), length) if padding_side == "left" else slice(0, len(sequence))
        input_ids[row, span] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, span] = 1
    return input_ids, attention_mask


__all__ = [
    "TransfusionProcessor",
    "add_special_tokens",
    "images_to_pixel_values",
    "pad_sequences",
    "special_token_ids",
]
