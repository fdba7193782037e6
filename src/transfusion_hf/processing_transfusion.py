"""TransfusionProcessor (tokenizer + image layout) and the training collator.

One processor serves training and inference, so a sequence is laid out the same way everywhere:
`[bos] text <boi> <image>*N <eoi> text ... [eos]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor
from transformers import BatchFeature, ProcessorMixin

from .noising import TransfusionNoiser

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

    def image_block(self) -> list[int]:
        """`<boi> <image>*N <eoi>` ids of one image."""
        return [self.boi_token_id] + [self.image_token_id] * self.num_image_tokens + [self.eoi_token_id]

    def encode_text(self, text: str) -> list[int]:
        """Ids of plain text (no special tokens added)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def encode_parts(
        self, parts: Sequence[str | Sequence[int] | None], add_bos: bool = True, add_eos: bool = False
    ) -> list[int]:
        """Lay out a sequence of text parts and images.

        Args:
            parts (`Sequence[str | Sequence[int] | None]`): text strings (or their ids, already encoded), and `None`
                where an image goes.
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
            if part is None:
                ids.extend(self.image_block())
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

        Returns:
            `BatchFeature` with `input_ids` and `attention_mask` `(batch_size, sequence_length)` and, when there are
            images, `pixel_values` `(num_images, 3, image_size, image_size)` in [-1, 1] and `timesteps`
            `(num_images,)` of zeros: the images enter as clean context (for training, replace images and
            timesteps by noised ones, see [`TransfusionNoiser`]).
        """
        texts = [text] if isinstance(text, str) else list(text or [""])
        for index, item in enumerate(texts):
            if not isinstance(item, str):
                raise ValueError(f"`text` must be a string or a list of strings, got text[{index}]={item!r}.")
        flat_images = flatten_images(images)
        self._check_image_counts(texts, images, flat_images)
        sequences = [self.encode_parts(self.split_text(item), add_eos=add_eos) for item in texts]
        input_ids, attention_mask = pad_sequences(sequences, self.tokenizer.pad_token_id, padding_side)
        data = {"input_ids": input_ids, "attention_mask": attention_mask}
        if flat_images:
            data["pixel_values"] = self.preprocess_images(flat_images)
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
    images: ImageInput | Sequence[ImageInput], image_size: int, resize_mode: str = "crop"
) -> torch.Tensor:
    """Convert images to `(num_images, 3, image_size, image_size)` pixel values in [-1, 1].

    Args:
        images: PIL images of any mode, numpy arrays `(H, W)` or `(H, W, C)` (uint8, or floats in [0, 1]), or tensors
            `(C, H, W)` in [-1, 1] or [0, 1].
        image_size (`int`): output side.
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
    processor = VaeImageProcessor(vae_scale_factor=1, do_resize=True, do_normalize=True)
    return processor.preprocess(converted, height=image_size, width=image_size, resize_mode=resize_mode)


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


def first_fit_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Greedy first-fit: each sequence, in order, goes into the first row with room for it (a new row when none has).

    Args:
        lengths (`Sequence[int]`): the length of each sequence, each at most `capacity`.
        capacity (`int`): tokens per row.

    Returns:
        `list[list[int]]`: the indices of the sequences of each row, in the order they were placed.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for index, length in enumerate(lengths):
        if length > capacity:
            raise ValueError(f"Sequence {index} has {length} tokens, more than the row length {capacity}.")
        for row, free in enumerate(room):
            if length <= free:
                rows[row].append(index)
                room[row] -= length
                break
        else:
            rows.append([index])
            room.append(capacity - length)
    return rows


def pack_sequences(
    sequences: Sequence[Sequence[int]], pad_token_id: int, max_sequence_length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[int]]]:
    """Pack id lists into rows of `max_sequence_length` tokens ([`first_fit_rows`]), so that a batch computes few pads.

    Like transformers' `DataCollatorWithFlattening`, the batch carries `position_ids` that restart at 0 for every
    sequence and no 2D attention mask: transformers' `create_causal_mask` then reads the sequence boundaries from the
    positions and keeps attention inside each sequence (the image blocks stay bidirectional inside it). The first token
    of each sequence gets the label -100, so no token is trained to predict the next sequence. The padding at the end
    of a row is positioned as a sequence of its own, which no real token attends to.

    Args:
        sequences (`Sequence[Sequence[int]]`): the ids of each sequence, each at most `max_sequence_length` long.
        pad_token_id (`int`): fills the end of the rows.
        max_sequence_length (`int`): tokens per row.

    Returns:
        `input_ids`, `labels` and `position_ids`, each `torch.LongTensor` of shape `(num_rows, max_sequence_length)`,
        and the indices of the sequences of each row.
    """
    rows = first_fit_rows([len(sequence) for sequence in sequences], max_sequence_length)
    shape = (len(rows), max_sequence_length)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, -100, dtype=torch.long)
    position_ids = torch.empty(shape, dtype=torch.long)
    for row, members in enumerate(rows):
        start = 0
        for index in members:
            ids = torch.tensor(sequences[index], dtype=torch.long)
            if not len(ids):
                continue
            span = slice(start, start + len(ids))
            input_ids[row, span] = ids
            labels[row, span] = ids
            labels[row, start] = -100
            position_ids[row, span] = torch.arange(len(ids))
            start += len(ids)
        position_ids[row, start:] = torch.arange(max_sequence_length - start)
    return input_ids, labels, position_ids, rows


class TransfusionDataCollator:
    """Collate (caption, clean latents) pairs, and text-only examples, into a training batch for
    [`TransfusionForMixedModal`].

    Each pair is laid out caption -> image or image -> caption, its caption is sometimes dropped (classifier-free
    guidance), and its image is noised, all by the [`TransfusionNoiser`] from one generator per batch, seeded from
    `(seed, num_batches)`. The draws of batch n are thus a pure function of n: a resumed run sets `num_batches` to the
    batches already trained and draws exactly what the uninterrupted run drew, even though data loaders collate one
    batch ahead. An example without latents is text-only (`[bos] text [eos]`, the paper's text data).

    A text longer than the context is cut (the image block and the special tokens are kept) and counted in
    `num_truncated`, instead of failing the run.

    With `max_sequence_length`, sequences are packed ([`pack_sequences`]): rows of exactly that many tokens, several
    sequences per row, each attending only to itself, and `position_ids` instead of `attention_mask` in the batch.
    The draws are made before packing, so a packed batch holds the same sequences and noised images as the padded
    batch of the same examples and gives the same loss; `latents` and the other per-image tensors follow the images'
    reading order in the rows.

    Args:
        processor (`TransfusionProcessor`).
        noiser (`TransfusionNoiser`).
        seed (`int`): base seed (add the process index in multi-process training).
        text_column (`str`): key of the caption (or the text of a text-only example) in each example.
        latents_column (`str`): key of the clean latents `(C, H, W)` in each example; missing or None: text-only.
        flipped_latents_column (`str`): key of the mirrored image's latents, when the data has them (random flip):
            each example uses one of the two with probability 1/2.
        max_length (`int`, *optional*): the model's context; longer texts are truncated.
        max_sequence_length (`int`, *optional*): pack the sequences into rows of this many tokens (at most
            `max_length`); longer texts are truncated to fit one row.
    """

    def __init__(
        self,
        processor: TransfusionProcessor,
        noiser: TransfusionNoiser,
        seed: int = 0,
        text_column: str = "text",
        latents_column: str = "latents",
        flipped_latents_column: str = "flipped_latents",
        max_length: int | None = None,
        max_sequence_length: int | None = None,
    ):
        for name, value in (("max_length", max_length), ("max_sequence_length", max_sequence_length)):
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"`{name}` must be a positive integer or None, got {value!r}.")
        if max_length is not None and max_sequence_length is not None and max_sequence_length > max_length:
            raise ValueError(
                f"`max_sequence_length`={max_sequence_length} is longer than `max_length`={max_length} (the model's "
                "context): packed rows must fit the context."
            )
        image_sequence = len(processor.encode_parts([None], add_bos=True, add_eos=True))
        for name, value in (("max_length", max_length), ("max_sequence_length", max_sequence_length)):
            if value is not None and value < image_sequence:
                raise ValueError(
                    f"`{name}`={value} cannot hold a training sequence: its image block and special tokens alone "
                    f"take {image_sequence} tokens."
                )
        self.processor = processor
        self.noiser = noiser
        self.seed = seed
        self.num_batches = 0
        self.num_truncated = 0
        self.text_column = text_column
        self.latents_column = latents_column
        self.flipped_latents_column = flipped_latents_column
        self.max_length = max_length
        self.max_sequence_length = max_sequence_length

    def batch_generator(self, batch_index: int) -> torch.Generator:
        """The generator of batch `batch_index` (a pure function of the seed and the index)."""
        return torch.Generator().manual_seed(hash((self.seed, batch_index)) & 0x7FFF_FFFF_FFFF)

    def encode_example(self, text: str, image_first: bool, has_image: bool) -> list[int]:
        """The ids of one training sequence: `[bos] text <boi> <image>*N <eoi> [eos]`, the image first when
        `image_first`, no image block when not `has_image`. A text too long for the limit (the smaller of
        `max_length` and `max_sequence_length`) is cut to fit and counted in `num_truncated`."""
        text_ids = self.processor.encode_text(text)
        fixed = len(self.processor.encode_parts([None] if has_image else [], add_bos=True, add_eos=True))
        # Packed rows are at most the context long (checked in `__init__`), so they set the limit when given.
        name = "max_sequence_length" if self.max_sequence_length is not None else "max_length"
        limit = getattr(self, name)
        if limit is not None and fixed + len(text_ids) > limit:
            if fixed > limit:
                raise ValueError(
                    f"`{name}`={limit} cannot hold a training sequence: its image block and special tokens alone "
                    f"take {fixed} tokens."
                )
            text_ids = text_ids[: limit - fixed]
            self.num_truncated += 1
        parts = ([None, text_ids] if image_first else [text_ids, None]) if has_image else [text_ids]
        return self.processor.encode_parts(parts, add_bos=True, add_eos=True)

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        generator = self.batch_generator(self.num_batches)
        self.num_batches += 1
        image_first, drop_caption = self.noiser.sample_layout(len(examples), generator)
        has_image = [example.get(self.latents_column) is not None for example in examples]
        sequences = [
            self.encode_example(
                "" if drop_caption[index] and has_image[index] else example[self.text_column],
                bool(image_first[index]),
                has_image[index],
            )
            for index, example in enumerate(examples)
        ]
        flip = torch.rand(len(examples), generator=generator) < 0.5
        pad_token_id = self.processor.tokenizer.pad_token_id
        if self.max_sequence_length is None:
            input_ids, attention_mask = pad_sequences(sequences, pad_token_id, "right")
            labels = input_ids.masked_fill(attention_mask == 0, -100)
            batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
            reading_order = list(range(len(examples)))
        else:
            input_ids, labels, position_ids, rows = pack_sequences(sequences, pad_token_id, self.max_sequence_length)
            batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
            reading_order = [index for row in rows for index in row]
        if any(has_image):
            images_in_order = [index for index in reading_order if has_image[index]]
            batch.update(self.noised_images(examples, image_first, flip, images_in_order, generator))
        return batch

    def noised_images(
        self,
        examples: Sequence[dict],
        image_first: torch.Tensor,
        flip: torch.Tensor,
        images_in_order: list[int],
        generator: torch.Generator,
    ) -> dict[str, torch.Tensor]:
        """Noise the images of the batch, drawn in example order, returned in `images_in_order` (the examples whose
        image comes first in the rows, then second, ...): `latents`, `timesteps`, `diffusion_targets` and, with
        loss weighting, `diffusion_loss_weights`."""
        with_image = sorted(images_in_order)
        clean = torch.stack(
            [
                torch.as_tensor(
                    examples[index][self.flipped_latents_column]
                    if flip[index] and self.flipped_latents_column in examples[index]
                    else examples[index][self.latents_column]
                )
                for index in with_image
            ]
        ).float()
        noised = self.noiser(clean, image_first[with_image], generator)
        slot = {index: position for position, index in enumerate(with_image)}
        order = torch.tensor([slot[index] for index in images_in_order], dtype=torch.long)
        images = {
            "latents": noised.latents[order],
            "timesteps": noised.timesteps[order],
            "diffusion_targets": noised.targets[order],
        }
        if noised.loss_weights is not None:
            images["diffusion_loss_weights"] = noised.loss_weights[order]
        return images


# `save_pretrained` copies this file (and the modules it imports) beside processor_config.json and names it in
# `auto_map`: `AutoProcessor.from_pretrained(..., trust_remote_code=True)` loads it without transfusion_hf installed.
TransfusionProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "TransfusionProcessor",
    "TransfusionDataCollator",
    "add_special_tokens",
    "first_fit_rows",
    "images_to_pixel_values",
    "pack_sequences",
    "pad_sequences",
    "special_token_ids",
]
