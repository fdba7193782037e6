"""train_bpe_tokenizer: a byte-level BPE tokenizer with the Transfusion special tokens."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pipeline_components import CAPTIONS  # noqa: E402
from transfusion_hf.processing_transfusion import special_token_ids  # noqa: E402
from transfusion_hf.tokenization_transfusion import SPECIAL_TOKENS, train_bpe_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(CAPTIONS * 4, vocab_size=300)


def test_trains_to_requested_size_and_learns_merges(tokenizer):
    assert 256 + len(SPECIAL_TOKENS) < len(tokenizer) <= 300
    # Merges were learned: a frequent caption word is shorter than its bytes.
    assert len(tokenizer("circle", add_special_tokens=False).input_ids) < len("circle")


def test_special_tokens_and_bos_eos_pad(tokenizer):
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    for token in ("<boi>", "<eoi>", "<image>"):
        assert token in tokenizer.all_special_tokens
        # A special token is one id, never split into bytes.
        assert tokenizer(token, add_special_tokens=False).input_ids == [tokenizer.convert_tokens_to_ids(token)]
    assert {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id} <= set(ids)


@pytest.mark.parametrize(
    "text",
    [
        "a red circle",
        "héllo wörld",
        "日本語のテキスト",
        "emoji 🎉🚀 and tabs\tand\nnewlines",
        "Ωμέγα ∑ ∫ √",
        "\u200b\u00a0x",
    ],
)
def test_byte_level_has_no_unknown_tokens(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert ids and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids).strip() == text.strip()


def test_decode_skips_special_tokens(tokenizer):
    ids = tokenizer("a red circle", add_special_tokens=False).input_ids
    special = special_token_ids(tokenizer)
    boi, image, eoi = special["boi_token_id"], special["image_token_id"], special["eoi_token_id"]
    full = [tokenizer.bos_token_id, *ids, boi, image, image, eoi, tokenizer.eos_token_id]
    assert tokenizer.decode(full, skip_special_tokens=True).strip() == "a red circle"


def test_save_and_reload(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "a green star 🎉"
    assert reloaded(text).input_ids == tokenizer(text).input_ids
    assert special_token_ids(reloaded) == special_token_ids(tokenizer)
    assert reloaded.pad_token == "<pad>"


def test_vocab_size_too_small_raises():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(CAPTIONS, vocab_size=256)
