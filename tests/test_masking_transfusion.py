"""The Transfusion mask: `build_transfusion_mask` (transformers' `create_causal_mask` with per-image blocks) against
the paper's per-pair definition (`naive_transfusion_mask`), for sdpa, eager and cached calls."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from tiny_configs import BOI_TOKEN_ID, EOI_TOKEN_ID, IMAGE_TOKEN_ID, TEXT_LOW, llama_text_config, tiny_config
from transfusion_hf.masking_transfusion import build_transfusion_mask, image_block_ids, naive_transfusion_mask

HIDDEN = 32


def text_config_for(attn_implementation: str):
    text_config = copy.deepcopy(tiny_config().text_config)
    text_config._attn_implementation = attn_implementation
    return text_config


def allowed_pattern(mask: torch.Tensor, attn_implementation: str) -> torch.BoolTensor:
    """(batch, q, kv) booleans from a backend's 4D mask."""
    assert mask.dim() == 4 and mask.shape[1] == 1, mask.shape
    if attn_implementation == "sdpa":
        assert mask.dtype == torch.bool
        return mask[:, 0]
    assert mask.is_floating_point()
    return mask[:, 0] == 0


def build_row(segments: list[tuple[str, int]]) -> list[int]:
    """`("text", n)`: n text tokens; `("image", n)`: `<boi> <image>*n <eoi>`."""
    row = []
    for kind, length in segments:
        if kind == "text":
            row += [TEXT_LOW + (len(row) % 50) for _ in range(length)]
        else:
            row += [BOI_TOKEN_ID] + [IMAGE_TOKEN_ID] * length + [EOI_TOKEN_ID]
    return row


def right_pad(rows: list[list[int]]) -> tuple[torch.LongTensor, torch.LongTensor]:
    length = max(len(row) for row in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, : len(row)] = torch.tensor(row)
        attention_mask[index, : len(row)] = 1
    return input_ids, attention_mask


def expected_pattern(input_ids: torch.LongTensor, attention_mask: torch.LongTensor | None) -> torch.BoolTensor:
    """The paper's mask, and no attention to padded keys."""
    allowed = naive_transfusion_mask(input_ids, IMAGE_TOKEN_ID)
    if attention_mask is not None:
        allowed &= attention_mask[:, None, :].bool()
    return allowed


# A row: a first text segment, then 0 to 3 images (1 to 5 placeholders each), each followed by 0 to 3 text tokens.
segment_lengths = st.integers(min_value=0, max_value=4)
image_sizes = st.integers(min_value=1, max_value=5)
row_strategy = st.tuples(
    segment_lengths, st.lists(st.tuples(image_sizes, st.integers(min_value=0, max_value=3)), min_size=0, max_size=3)
)


def row_from_draw(draw: tuple[int, list[tuple[int, int]]]) -> list[int]:
    first, images = draw
    segments = [("text", max(first, 1))]
    for image_size, text_after in images:
        segments += [("image", image_size), ("text", text_after)]
    return build_row(segments)


# ------------------------------------------------------------------------------------------------------ tests
def test_image_block_ids_numbers_images_per_row():
    rows = [
        build_row([("text", 2), ("image", 2), ("text", 1), ("image", 3)]),
        build_row([("text", 3)]),
        build_row([("image", 1), ("image", 1), ("text", 1)]),
    ]
    input_ids, _ = right_pad(rows)
    ids = image_block_ids(input_ids, IMAGE_TOKEN_ID)
    assert ids[0, : len(rows[0])].tolist() == [-1, -1, -1, 0, 0, -1, -1, -1, 1, 1, 1, -1]
    assert (ids[1] == -1).all()
    assert ids[2, : len(rows[2])].tolist() == [-1, 0, -1, -1, 1, -1, -1]


def test_naive_mask_small_example():
    input_ids = torch.tensor([build_row([("text", 1), ("image", 2), ("text", 1)])])  # t boi i i eoi t
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],  # first patch sees the second one
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(naive_transfusion_mask(input_ids, IMAGE_TOKEN_ID)[0], expected)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@settings(max_examples=25, deadline=None, derandomize=True)
@given(rows=st.lists(row_strategy, min_size=1, max_size=3))
def test_mask_matches_naive_oracle(attn_implementation, rows):
    input_ids, attention_mask = right_pad([row_from_draw(row) for row in rows])
    text_config = text_config_for(attn_implementation)
    embeds = torch.zeros(*input_ids.shape, HIDDEN)
    mask = build_transfusion_mask(text_config, embeds, input_ids, IMAGE_TOKEN_ID, attention_mask=attention_mask)
    pattern = allowed_pattern(mask, attn_implementation)
    expected = expected_pattern(input_ids, attention_mask)
    # Padded query rows are never read; compare the rows of real tokens.
    real = attention_mask.bool()
    assert torch.equal(pattern[real], expected[real])


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_mask_without_padding_mask_matches_oracle(attn_implementation):
    rows = [build_row([("text", 2), ("image", 4), ("text", 1), ("image", 4), ("image", 4), ("text", 2)])]
    input_ids, _ = right_pad(rows)
    mask = build_transfusion_mask(
        text_config_for(attn_implementation), torch.zeros(*input_ids.shape, HIDDEN), input_ids, IMAGE_TOKEN_ID
    )
    assert torch.equal(allowed_pattern(mask, attn_implementation), naive_transfusion_mask(input_ids, IMAGE_TOKEN_ID))


def test_adjacent_images_do_not_see_each_others_future():
    """Two images separated only by `<eoi><boi>` keep separate ids: patches of image 0 cannot see image 1."""
    input_ids = torch.tensor([build_row([("text", 1), ("image", 3), ("image", 3)])])
    mask = build_transfusion_mask(
        text_config_for("sdpa"), torch.zeros(*input_ids.shape, HIDDEN), input_ids, IMAGE_TOKEN_ID
    )[0, 0]
    first_image, second_image = [2, 3, 4], [7, 8, 9]
    assert mask[first_image][:, first_image].all()
    assert not mask[first_image][:, second_image].any()
    assert mask[second_image][:, first_image].all()


def _random_cache(text_config, batch_size: int, past_length: int) -> DynamicCache:
    cache = DynamicCache(config=text_config)
    head_dim = text_config.hidden_size // text_config.num_attention_heads
    generator = torch.Generator().manual_seed(0)
    for layer in range(text_config.num_hidden_layers):
        shape = (batch_size, text_config.num_key_value_heads, past_length, head_dim)
        cache.update(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator), layer)
    return cache


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("with_padding_mask", [False, True])
def test_cached_image_block_matches_oracle_rows(attn_implementation, with_padding_mask):
    """Prefix (text, an earlier image, text, `<boi>`) in a DynamicCache; the new chunk is one image block."""
    num_patches = 4
    prefix = build_row([("text", 3), ("image", num_patches), ("text", 2)]) + [BOI_TOKEN_ID]
    full = torch.tensor([prefix + [IMAGE_TOKEN_ID] * num_patches] * 2)
    past_length = len(prefix)
    text_config = text_config_for(attn_implementation)
    cache = _random_cache(text_config, batch_size=2, past_length=past_length)
    new_ids = full[:, past_length:]
    attention_mask = torch.ones_like(full) if with_padding_mask else None
    mask = build_transfusion_mask(
        text_config,
        torch.zeros(2, num_patches, HIDDEN),
        new_ids,
        IMAGE_TOKEN_ID,
        attention_mask=attention_mask,
        cache=cache,
    )
    pattern = allowed_pattern(mask, attn_implementation)
    assert pattern.shape == (2, num_patches, full.shape[1])
    expected = naive_transfusion_mask(full, IMAGE_TOKEN_ID)[:, past_length:, :]
    assert torch.equal(pattern, expected)
    # The new image is fully bidirectional and sees the whole prefix.
    assert pattern.all()


def test_cached_text_chunk_after_image_is_causal():
    """After the image is written to the cache, the next chunk (`<eoi>` + text) is plain causal."""
    prefix = build_row([("text", 2)]) + [BOI_TOKEN_ID] + [IMAGE_TOKEN_ID] * 4
    chunk = [EOI_TOKEN_ID, TEXT_LOW, TEXT_LOW + 1]
    full = torch.tensor([prefix + chunk])
    text_config = text_config_for("sdpa")
    cache = _random_cache(text_config, batch_size=1, past_length=len(prefix))
    mask = build_transfusion_mask(
        text_config, torch.zeros(1, len(chunk), HIDDEN), torch.tensor([chunk]), IMAGE_TOKEN_ID, cache=cache
    )
    expected = naive_transfusion_mask(full, IMAGE_TOKEN_ID)[:, len(prefix) :, :]
    assert torch.equal(allowed_pattern(mask, "sdpa"), expected)


def test_sliding_window_backbone_gets_dict_of_masks():
    text_config = copy.deepcopy(
        tiny_config(
            text_config=llama_text_config(
                model_type="qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1
            )
        ).text_config
    )
    text_config._attn_implementation = "sdpa"
    if "sliding_attention" not in (getattr(text_config, "layer_types", None) or ()):
        pytest.skip("this Qwen2 config has no sliding-attention layers")
    input_ids = torch.tensor([build_row([("text", 6), ("image", 4), ("text", 3)])])
    masks = build_transfusion_mask(text_config, torch.zeros(1, input_ids.shape[1], HIDDEN), input_ids, IMAGE_TOKEN_ID)
    assert set(masks) == {"full_attention", "sliding_attention"}
    assert torch.equal(masks["full_attention"][:, 0], naive_transfusion_mask(input_ids, IMAGE_TOKEN_ID))
    sliding = masks["sliding_attention"][0, 0]
    # Image positions 7..10 still see each other inside the window.
    assert sliding[7:11, 7:11].all()
    assert not sliding[12, 0]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_mistral_style_sliding_window_backbone(attn_implementation):
    """Backbones without `layer_types` (Mistral, Mixtral, Phi3, ...) slide on every layer when `sliding_window` is set:
    the mixed mask must keep the window (and the bidirectional image blocks), like the backbone's own text mask."""
    window = 3
    text_config = copy.deepcopy(
        tiny_config(text_config=llama_text_config(model_type="mistral", sliding_window=window, head_dim=8)).text_config
    )
    text_config._attn_implementation = attn_implementation
    assert getattr(text_config, "layer_types", None) is None
    input_ids = torch.tensor([build_row([("text", 5), ("image", 4), ("text", 4)])])
    mask = build_transfusion_mask(text_config, torch.zeros(1, input_ids.shape[1], HIDDEN), input_ids, IMAGE_TOKEN_ID)
    length = input_ids.shape[1]
    query, key = torch.arange(length)[:, None], torch.arange(length)[None, :]
    ids = image_block_ids(input_ids, IMAGE_TOKEN_ID)[0]
    same_image = (ids[:, None] == ids[None, :]) & (ids[:, None] >= 0)
    expected = ((key <= query) & (query - key < window)) | same_image
    assert torch.equal(allowed_pattern(mask, attn_implementation)[0], expected)


def packed(documents: list[list[int]], length: int) -> tuple[torch.LongTensor, torch.LongTensor, torch.LongTensor]:
    """One packed row: the documents back to back, positions restarting per document, padding as its own document.
    Returns `(input_ids, position_ids, document_of_each_position)`, each of shape `(1, length)`."""
    ids = [token for document in documents for token in document]
    positions = [position for document in documents for position in range(len(document))]
    document_of = [index for index, document in enumerate(documents) for _ in document]
    tail = length - len(ids)
    ids += [0] * tail
    positions += list(range(tail))
    document_of += [len(documents)] * tail
    return torch.tensor([ids]), torch.tensor([positions]), torch.tensor([document_of])


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_documents_attend_only_inside_themselves(attn_implementation):
    """Packed rows (positions restarting per document, no 2D mask): transformers' `create_causal_mask` keeps each
    document to itself, and the images stay bidirectional inside their document, image-first or not."""
    documents = [
        build_row([("text", 3), ("image", 3), ("text", 1)]),  # caption-first
        build_row([("text", 1), ("image", 4), ("text", 2)]),  # image-first (after its BOS)
        build_row([("text", 4)]),  # text-only
        build_row([("image", 2), ("image", 2)]),  # two images in one document stay apart
    ]
    input_ids, position_ids, document_of = packed(documents, length=sum(map(len, documents)) + 3)
    mask = build_transfusion_mask(
        text_config_for(attn_implementation),
        torch.zeros(*input_ids.shape, HIDDEN),
        input_ids,
        IMAGE_TOKEN_ID,
        position_ids=position_ids,
    )
    same_document = document_of[:, :, None] == document_of[:, None, :]
    expected = naive_transfusion_mask(input_ids, IMAGE_TOKEN_ID) & same_document
    assert torch.equal(allowed_pattern(mask, attn_implementation), expected)
    # Without the restarting positions the row is one sequence: the documents would see each other.
    unpacked = build_transfusion_mask(
        text_config_for(attn_implementation), torch.zeros(*input_ids.shape, HIDDEN), input_ids, IMAGE_TOKEN_ID
    )
    assert allowed_pattern(unpacked, attn_implementation)[~same_document].any()


@pytest.mark.slow
def test_flex_attention_block_mask_matches_oracle():
    """flex_attention gets a BlockMask; its `mask_mod`, evaluated on every pair, is the paper's mask. Slow on CPU
    (building the BlockMask compiles for about 30 s): run with `-m slow`."""
    input_ids, attention_mask = right_pad(
        [build_row([("text", 2), ("image", 4), ("text", 1), ("image", 3)]), build_row([("text", 5)])]
    )
    block_mask = build_transfusion_mask(
        text_config_for("flex_attention"),
        torch.zeros(*input_ids.shape, HIDDEN),
        input_ids,
        IMAGE_TOKEN_ID,
        attention_mask=attention_mask,
    )
    assert type(block_mask).__name__ == "BlockMask"
    batch_size, length = input_ids.shape
    mask_mod = block_mask.mask_mod
    over_kv = torch.vmap(mask_mod, in_dims=(None, None, None, 0))
    over_q = torch.vmap(over_kv, in_dims=(None, None, 0, None))
    over_batch = torch.vmap(over_q, in_dims=(0, None, None, None))
    dense = over_batch(torch.arange(batch_size), torch.tensor(0), torch.arange(length), torch.arange(length))
    expected = expected_pattern(input_ids, attention_mask)
    real = attention_mask.bool()
    assert torch.equal(dense[real], expected[real])
