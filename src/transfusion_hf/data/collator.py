"""The training collator: (caption, clean latents) pairs, interleaved documents (text and several images, each noised
or kept clean as context, e.g. image editing) and text-only rows into a [`TransfusionForMixedModal`] batch, each noised
image noised by the [`TransfusionNoiser`], padded or packed into rows of a fixed length.

Training-only: the processor (`processing_transfusion`) lays sequences out for training and inference alike; this
module adds the noising, the caption dropout and the packing, so inference never imports the training noise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..image_grids import stack_if_same_grid
from ..noising import TransfusionNoiser
from ..processing_transfusion import TransfusionProcessor, pad_sequences
from .interleaved import document_example
from .latent_cache import unflatten_latents

DEFAULT_CLEAN_IMAGE_PROBABILITY = 0.5
"""The chance that a document's image (not its last part) is kept clean as context. The paper noises every image
(0.0); trained on the built-in edits written as documents, editing accuracy rose from 0.70 at 0.0 to 0.85 at 0.5 (two
seeds) and 0.97 at 1.0 (docs/research/image_sizes.md), and 0.5 still trains every image half the time."""


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


@dataclass
class ImageSegment:
    """One image of a laid-out training document.

    Args:
        latents (`torch.Tensor` of shape `(C, H, W)`): the clean latents.
        noised (`bool`): noised and trained (a timestep and a target), or clean context (t = 0, no loss).
        capped (`bool`): noised under the noiser's image-first limit (the image of an image-first pair).
        drawn (`bool`): `noised` was drawn (`clean_image_probability`), not given by the example.
    """

    latents: torch.Tensor
    noised: bool
    capped: bool = False
    drawn: bool = False


def noise_a_clean_end(document: list[str | ImageSegment]) -> list[str | ImageSegment]:
    """The document with its last part noised if that part is an image drawn clean (`clean_image_probability`): clean,
    it is context for nothing and would train nothing. The draw never makes the last part clean, but dropping the
    texts or a cut at the context length can leave such an image last. Noised here rather than drawn again, so the
    batch's draws stay as they were; an image the example itself asks to keep clean stays clean."""
    if document and isinstance(document[-1], ImageSegment) and document[-1].drawn and not document[-1].noised:
        return [*document[:-1], dataclasses.replace(document[-1], noised=True)]
    return document


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
        processor (`TransfusionProcessor`): lays out the sequences.
        noiser (`TransfusionNoiser`): noises the images.
        seed (`int`): base seed (add the process index in multi-process training).
        text_column (`str`): key of the caption (or the text of a text-only example) in each example.
        latents_column (`str`): key of the clean latents `(C, H, W)` in each example; missing or None: text-only.
        flipped_latents_column (`str`): key of the mirrored image's latents, when the data has them (random flip):
            each example uses one of the two with probability 1/2.
        source_latents_column (`str`): key of the clean source image's latents `(C, H, W)` of an edit example.
        max_length (`int`, *optional*): the model's context; longer texts are truncated.
        max_sequence_length (`int`, *optional*): pack the sequences into rows of this many tokens (at most
            `max_length`); longer texts are truncated to fit one row.
        patch_size (`int`, *optional*): the model's `patch_size` (in latents). Given, the examples' latents may
            have any size (each image takes `(H // patch_size) * (W // patch_size)` placeholders; a batch of one size
            gives one `latents` tensor, mixed sizes a list of `(C, H_i, W_i)` tensors, noised one size at a time);
            without it every image takes the processor's `num_image_tokens`.
        clean_image_probability (`float`): the chance that an image of a document whose `noised` is unset (a cached
            interleaved document, `interleaved.document_example`) is kept clean as context instead of noised; drawn
            per image, only when above 0, never for the document's last part (a clean image there would train
            nothing). Default [`DEFAULT_CLEAN_IMAGE_PROBABILITY`] (0.5); at 0, every image is noised with its own t
            (the paper's interleaved training).

    Documents (`{"segments": [...]}`) longer than the limit are cut at it, as a language model's text is: an image
    block is never split, so the first image that does not fit whole ends the document; an edit
    (`source_latents`) keeps both images and cuts its instruction.
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
        patch_size: int | None = None,
        source_latents_column: str = "source_latents",
        clean_image_probability: float = DEFAULT_CLEAN_IMAGE_PROBABILITY,
    ):
        if not 0.0 <= clean_image_probability <= 1.0:
            raise ValueError(f"`clean_image_probability` must be in [0, 1], got {clean_image_probability!r}.")
        for name, value in (
            ("max_length", max_length),
            ("max_sequence_length", max_sequence_length),
            ("patch_size", patch_size),
        ):
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
        self.patch_size = patch_size
        self.source_latents_column = source_latents_column
        self.clean_image_probability = clean_image_probability

    def batch_generator(self, batch_index: int) -> torch.Generator:
        """The generator of batch `batch_index` (a pure function of the seed and the index)."""
        return torch.Generator().manual_seed(hash((self.seed, batch_index)) & 0x7FFF_FFFF_FFFF)

    def encode_example(
        self, text: str, image_first: bool, has_image: bool, num_image_tokens: int | None = None
    ) -> list[int]:
        """The ids of one training sequence: `[bos] text <boi> <image>*N <eoi> [eos]`, the image first when
        `image_first`, no image block when not `has_image`; N = `num_image_tokens` (default: the processor's). A
        text too long for the limit (the smaller of `max_length` and `max_sequence_length`) is cut to fit and counted
        in `num_truncated`."""
        text_ids = self.processor.encode_text(text)
        image = num_image_tokens
        fixed = len(self.processor.encode_parts([image] if has_image else [], add_bos=True, add_eos=True))
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
        parts = ([image, text_ids] if image_first else [text_ids, image]) if has_image else [text_ids]
        return self.processor.encode_parts(parts, add_bos=True, add_eos=True)

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        # Rows of a bucketed latent cache hold flat latents and their shape.
        # Rows of a cache of interleaved documents hold their texts and their images' flat latents.
        examples = [document_example(unflatten_latents(example)) for example in examples]
        generator = self.batch_generator(self.num_batches)
        self.num_batches += 1
        if any(self.is_document(example) for example in examples):
            return self.collate_documents(examples, generator)
        image_first, drop_caption = self.noiser.sample_layout(len(examples), generator)
        has_image = [example.get(self.latents_column) is not None for example in examples]
        sequences = [
            self.encode_example(
                "" if drop_caption[index] and has_image[index] else example[self.text_column],
                bool(image_first[index]),
                has_image[index],
                self.num_image_tokens(example) if has_image[index] else None,
            )
            for index, example in enumerate(examples)
        ]
        flip = torch.rand(len(examples), generator=generator) < 0.5
        batch, reading_order = self.pad_or_pack(sequences)
        if any(has_image):
            images_in_order = [index for index in reading_order if has_image[index]]
            batch.update(self.noised_images(examples, image_first, flip, images_in_order, generator))
        return batch

    def pad_or_pack(self, sequences: list[list[int]]) -> tuple[dict[str, torch.Tensor], list[int]]:
        """Pad the sequences into a batch (`attention_mask`), or pack them (`position_ids`) with
        `max_sequence_length`; returns the batch and the sequences in reading order (row by row)."""
        pad_token_id = self.processor.tokenizer.pad_token_id
        if self.max_sequence_length is None:
            input_ids, attention_mask = pad_sequences(sequences, pad_token_id, "right")
            labels = input_ids.masked_fill(attention_mask == 0, -100)
            return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}, list(
                range(len(sequences))
            )
        input_ids, labels, position_ids, rows = pack_sequences(sequences, pad_token_id, self.max_sequence_length)
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        return batch, [index for row in rows for index in row]

    def is_document(self, example: dict) -> bool:
        """Whether an example has several images or a clean one: `segments`, or an edit's `source_latents`."""
        return example.get("segments") is not None or example.get(self.source_latents_column) is not None

    def collate_documents(self, examples: Sequence[dict], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Collate a batch holding interleaved documents (see the class docstring): lay out every example as a
        document, draw its text dropout, pad or pack, then noise its noised images."""
        image_first, drop_caption = self.noiser.sample_layout(len(examples), generator)
        drop_text = torch.rand(len(examples), generator=generator) < self.noiser.caption_dropout_probability
        flip = torch.rand(len(examples), generator=generator) < 0.5
        documents = [
            self.example_document(
                example,
                bool(image_first[index]),
                bool(drop_caption[index]),
                bool(drop_text[index]),
                bool(flip[index]),
                generator,
            )
            for index, example in enumerate(examples)
        ]
        sequences = []
        for index, example in enumerate(examples):
            # A document is cut at the limit (dropping the images past it); an edit cuts its text.
            ids, documents[index] = self.encode_document(documents[index], cut_at_limit="segments" in example)
            sequences.append(ids)
        batch, reading_order = self.pad_or_pack(sequences)
        if any(isinstance(segment, ImageSegment) for document in documents for segment in document):
            batch.update(self.document_images(documents, reading_order, generator))
        return batch

    def example_document(
        self,
        example: dict,
        image_first: bool,
        drop_caption: bool,
        drop_text: bool,
        flip: bool,
        generator: torch.Generator | None = None,
    ) -> list[str | ImageSegment]:
        """One example as a document: text strings and [`ImageSegment`]s in reading order, text dropped as drawn, an
        image whose `noised` is unset noised or kept clean as drawn (`clean_image_probability`, from `generator`)."""
        if example.get("segments") is not None:
            document = []
            segments = example["segments"]
            for position, segment in enumerate(segments):
                if isinstance(segment, str):
                    document.append(segment)
                    continue
                latents = torch.as_tensor(segment["latents"]).float()
                noised = segment.get("noised")
                drawn = noised is None
                if drawn:
                    # A clean image is context for what follows it: the document's last part stays noised (clean, it
                    # would train nothing). Drawn only when asked, so the paper's setting draws nothing more.
                    clean = (
                        self.clean_image_probability > 0
                        and position < len(segments) - 1
                        and torch.rand((), generator=generator).item() < self.clean_image_probability
                    )
                    noised = not clean
                document.append(ImageSegment(latents, bool(noised), drawn=drawn))
            if drop_text and any(isinstance(part, ImageSegment) and part.noised for part in document):
                document = noise_a_clean_end([part for part in document if not isinstance(part, str)])
            return document
        text = example.get(self.text_column) or ""
        if example.get(self.source_latents_column) is not None:
            source = ImageSegment(torch.as_tensor(example[self.source_latents_column]).float(), noised=False)
            target = ImageSegment(torch.as_tensor(example[self.latents_column]).float(), noised=True)
            # No flip: an edit's instruction may name a side ("move it to the left"), which a mirror would falsify.
            return [source, target] if drop_text else [source, text, target]
        if example.get(self.latents_column) is None:
            return [text]
        key = self.latents_column
        if flip and self.flipped_latents_column in example:
            key = self.flipped_latents_column
        image = ImageSegment(torch.as_tensor(example[key]).float(), noised=True, capped=image_first)
        if image_first:
            return [image, text]
        return [image] if drop_caption else [text, image]

    def encode_document(
        self, document: list[str | ImageSegment], cut_at_limit: bool = False
    ) -> tuple[list[int], list[str | ImageSegment]]:
        """The ids of one document and the document they hold. Over the limit (the smaller of `max_length` and
        `max_sequence_length`), it is cut there with `cut_at_limit` (an image that does not fit whole ends it), else
        its texts are cut from the last one back; either is counted in `num_truncated`."""
        parts = [
            self.processor.encode_text(part) if isinstance(part, str) else self.placeholders_for(part.latents)
            for part in document
        ]
        if cut_at_limit:
            return self.cut_document(document, parts)
        images = [part for part in parts if not isinstance(part, list)]
        fixed = len(self.processor.encode_parts(images, add_bos=True, add_eos=True))
        name = "max_sequence_length" if self.max_sequence_length is not None else "max_length"
        limit = getattr(self, name)
        excess = fixed + sum(len(part) for part in parts if isinstance(part, list)) - (limit or 0)
        if limit is not None and excess > 0:
            if fixed > limit:
                raise ValueError(
                    f"`{name}`={limit} cannot hold a training document: its image blocks and special tokens alone "
                    f"take {fixed} tokens."
                )
            for position in reversed(range(len(parts))):
                if isinstance(parts[position], list) and excess > 0:
                    cut = min(excess, len(parts[position]))
                    parts[position] = parts[position][: len(parts[position]) - cut]
                    excess -= cut
            self.num_truncated += 1
        return self.processor.encode_parts(parts, add_bos=True, add_eos=True), document

    def cut_document(
        self, document: list[str | ImageSegment], parts: list[list[int] | int | None]
    ) -> tuple[list[int], list[str | ImageSegment]]:
        """[`encode_document`] with `cut_at_limit`: keep the longest prefix of the document that fits the limit after
        `[bos]`, a text cut within, an image kept whole or dropped with all that follows. A cut document gets no
        `[eos]` (it does not end there: the model must not learn to end it), as language-model pre-training leaves
        its cut chunks; its last token then predicts nothing (padding, or a packed row's next sequence, whose first
        label is -100)."""
        name = "max_sequence_length" if self.max_sequence_length is not None else "max_length"
        limit = getattr(self, name)
        ids = self.processor.encode_parts(parts, add_bos=True, add_eos=True)
        if limit is None or len(ids) <= limit:
            return ids, document
        budget = limit - len(self.processor.encode_parts([], add_bos=True, add_eos=False))
        kept_parts, kept = [], []
        for part, segment in zip(parts, document):
            cost = len(part) if isinstance(part, list) else len(self.processor.image_block(part))
            if cost <= budget:
                kept_parts.append(part)
                kept.append(segment)
                budget -= cost
                continue
            if isinstance(part, list) and budget > 0:
                kept_parts.append(part[:budget])
                kept.append(segment)
            break
        kept = noise_a_clean_end(kept)
        self.num_truncated += 1
        return self.processor.encode_parts(kept_parts, add_bos=True, add_eos=False), kept

    def document_images(
        self, documents: list[list[str | ImageSegment]], reading_order: list[int], generator: torch.Generator
    ) -> dict[str, torch.Tensor | list[torch.Tensor | None]]:
        """`latents`, `timesteps`, `diffusion_targets` (and `diffusion_loss_weights`) of the documents' images in
        reading order. The noised images are drawn in document order, one size at a time (in order of first
        appearance, so the draws are a pure function of the batch); clean images get t = 0 and the target None.
        `latents` is a tensor when all the images have one size (else a list), `diffusion_targets` a tensor when
        moreover every image is noised (else a list)."""
        drawn = [part for document in documents for part in document if isinstance(part, ImageSegment)]
        noised = [index for index, part in enumerate(drawn) if part.noised]
        targets: list[torch.Tensor | None] = [None] * len(drawn)
        latents = [part.latents for part in drawn]
        timesteps, weights = torch.zeros(len(drawn)), None
        for grid in dict.fromkeys(tuple(drawn[index].latents.shape) for index in noised):
            members = [index for index in noised if tuple(drawn[index].latents.shape) == grid]
            capped = torch.tensor([drawn[index].capped for index in members])
            result = self.noiser(torch.stack([drawn[index].latents for index in members]), capped, generator)
            # Timesteps keep the noiser's dtype (integers for DDPM, floats for flow matching).
            timesteps = timesteps.to(result.timesteps.dtype)
            timesteps[members] = result.timesteps
            if result.loss_weights is not None:
                weights = torch.ones(len(drawn)) if weights is None else weights
                weights[members] = result.loss_weights
            for slot, index in enumerate(members):
                latents[index], targets[index] = result.latents[slot], result.targets[slot]
        # The images of each document are consecutive in `drawn`: map reading order to their indices.
        starts, start = [], 0
        for document in documents:
            starts.append(start)
            start += sum(isinstance(part, ImageSegment) for part in document)
        order = [
            starts[index] + offset
            for index in reading_order
            for offset in range(sum(isinstance(part, ImageSegment) for part in documents[index]))
        ]
        latents, targets = [latents[index] for index in order], [targets[index] for index in order]
        images = {
            "latents": stack_if_same_grid(latents),
            "timesteps": timesteps[order],
            # None marks a clean image (no loss): such targets stay a list.
            "diffusion_targets": targets if None in targets else stack_if_same_grid(targets),
        }
        if weights is not None:
            images["diffusion_loss_weights"] = weights[order]
        return images

    def num_image_tokens(self, example: dict) -> int | None:
        """Placeholders of the example's image: from its latents' size with `patch_size`, else the processor's."""
        if self.patch_size is None:
            return None
        return self.placeholders_for(example[self.latents_column])

    def placeholders_for(self, latents: torch.Tensor) -> int | None:
        """Placeholders of an image of these latents `(C, H, W)`: from their size with `patch_size`, else None (the
        processor's `num_image_tokens`)."""
        if self.patch_size is None:
            return None
        height, width = (int(side) for side in torch.as_tensor(latents).shape[-2:])
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"An example's `{self.latents_column}` are {height}x{width}, not a whole number of patches of "
                f"`patch_size`={self.patch_size}."
            )
        return (height // self.patch_size) * (width // self.patch_size)

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
        clean = [
            torch.as_tensor(
                examples[index][self.flipped_latents_column]
                if flip[index] and self.flipped_latents_column in examples[index]
                else examples[index][self.latents_column]
            ).float()
            for index in with_image
        ]
        slot = {index: position for position, index in enumerate(with_image)}
        order = torch.tensor([slot[index] for index in images_in_order], dtype=torch.long)
        return self.noised_images_by_size(clean, image_first[with_image], order, generator)

    def noised_images_by_size(
        self, clean: list[torch.Tensor], image_first: torch.Tensor, order: torch.Tensor, generator: torch.Generator
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Noise the images one size at a time (in order of first appearance, so the draws are a pure function of the
        batch; a batch of one size is one draw, as before sizes could differ), returned in `order`: `latents` and
        `diffusion_targets` one tensor when every image has one size, else lists."""
        num_images = len(clean)
        latents, targets = [None] * num_images, [None] * num_images
        timesteps = weights = None
        for grid in dict.fromkeys(tuple(image.shape) for image in clean):
            members = [index for index, image in enumerate(clean) if tuple(image.shape) == grid]
            noised = self.noiser(torch.stack([clean[i] for i in members]), image_first[members], generator)
            if timesteps is None:
                timesteps = torch.empty(num_images, dtype=noised.timesteps.dtype)
            timesteps[members] = noised.timesteps
            if noised.loss_weights is not None:
                if weights is None:
                    weights = torch.empty(num_images, dtype=noised.loss_weights.dtype)
                weights[members] = noised.loss_weights
            for slot, index in enumerate(members):
                latents[index], targets[index] = noised.latents[slot], noised.targets[slot]
        images = {
            "latents": stack_if_same_grid([latents[i] for i in order.tolist()]),
            "timesteps": timesteps[order],
            "diffusion_targets": stack_if_same_grid([targets[i] for i in order.tolist()]),
        }
        if weights is not None:
            images["diffusion_loss_weights"] = weights[order]
        return images


# `save_pretrained` copies this file (and the modules it imports) beside processor_config.json and names it in
# `auto_map`: `AutoProcessor.from_pretrained(..., trust_remote_code=True)` loads it without transfusion_hf installed.
TransfusionProcessor.register_for_auto_class("AutoProcessor")


__all__ = ["ImageSegment", "TransfusionDataCollator", "first_fit_rows", "pack_sequences"]
