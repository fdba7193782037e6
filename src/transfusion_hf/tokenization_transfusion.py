"""Train a small byte-level BPE tokenizer on captions, for data sets that come without a pretrained tokenizer."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<boi>", "<eoi>", "<image>")


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 512, min_frequency: int = 1
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with the `tokenizers` library.

    Byte-level BPE never meets an unknown character, so any later prompt can be encoded.

    Args:
        texts (`Iterable[str]`): the training captions.
        vocab_size (`int`, defaults to 512): target size, including the 256 byte symbols and the special tokens.
        min_frequency (`int`, defaults to 1): merges seen fewer times are not learned.

    Returns:
        A `PreTrainedTokenizerFast` with `<s>`/`</s>` as BOS/EOS, `<pad>`, and the `<boi>`, `<eoi>`, `<image>` tokens.
    """
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(
            f"`vocab_size`={vocab_size} is below {minimum} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)."
        )
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<boi>", "<eoi>", "<image>"],
    )


__all__ = ["train_bpe_tokenizer", "SPECIAL_TOKENS"]
