"""Interleaved documents in the training collator: several images per sequence, each noised or kept clean as context
(`segments`), and edits (`source_latents`): layout, draws, dropout, padding and packing, mixed sizes, and a diffusion
loss that covers the noised images only."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pipeline_components import CAPTIONS, get_tokenizer, perturb_  # noqa: E402
from tiny_configs import llama_text_config, tiny_config  # noqa: E402
from transfusion_hf import TransfusionForMixedModal  # noqa: E402
from transfusion_hf.data.collator import TransfusionDataCollator  # noqa: E402
from transfusion_hf.noising import TransfusionNoiser  # noqa: E402
from transfusion_hf.processing_transfusion import TransfusionProcessor, special_token_ids  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer()


def latents(seed: int, height: int = 4, width: int = 4) -> torch.Tensor:
    return torch.randn(4, height, width, generator=torch.Generator().manual_seed(seed))


def documents(count: int = 6) -> list[dict]:
    """Documents `[text, clean image, text, noised image]`, edits and text-only rows, texts of mixed lengths."""
    examples = []
    for index in range(count):
        text = " ".join(CAPTIONS[index % len(CAPTIONS) : index % len(CAPTIONS) + 1 + index % 3])
        if index % 3 == 0:
            segments = [text, {"latents": latents(index), "noised": False}, "then", {"latents": latents(100 + index)}]
            examples.append({"segments": segments})
        elif index % 3 == 1:
            examples.append({"source_latents": latents(index), "text": text, "latents": latents(100 + index)})
        else:
            examples.append({"text": text})
    return examples


def build_collator(tokenizer, dropout: float = 0.0, **kwargs) -> TransfusionDataCollator:
    processor = TransfusionProcessor(tokenizer, image_size=4, num_image_tokens=4)
    noiser = TransfusionNoiser(
        FlowMatchEulerDiscreteScheduler(), "flow_prediction", caption_dropout_probability=dropout
    )
    return TransfusionDataCollator(processor, noiser, seed=3, **kwargs)


def build_model(tokenizer, **fields) -> TransfusionForMixedModal:
    text_config = llama_text_config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = tiny_config(text_config, **special_token_ids(tokenizer), **fields)
    torch.manual_seed(0)
    # Perturbed: the zero-initialised output layers would give every image the same (zero) prediction.
    return perturb_(TransfusionForMixedModal(config), seed=1).eval()


def test_documents_are_laid_out_in_order_with_clean_context_images(tokenizer):
    collator = build_collator(tokenizer)
    processor = collator.processor
    examples = documents(2)
    batch = collator(examples)
    block = processor.image_block(4)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    first = [bos, *processor.encode_text(examples[0]["segments"][0]), *block, *processor.encode_text("then")]
    first += [*block, eos]
    edit = [bos, *block, *processor.encode_text(examples[1]["text"]), *block, eos]
    for row, expected in enumerate((first, edit)):
        assert batch["input_ids"][row, : len(expected)].tolist() == expected
        assert batch["attention_mask"][row].sum() == len(expected)
    # Reading order: document 0's clean image then its noised one, then the edit's clean source and noised target.
    assert batch["timesteps"][0] == 0 and batch["timesteps"][2] == 0
    assert batch["timesteps"][1] > 0 and batch["timesteps"][3] > 0
    targets = batch["diffusion_targets"]
    assert targets[0] is None and targets[2] is None
    torch.testing.assert_close(batch["latents"][0], examples[0]["segments"][1]["latents"])  # clean: unchanged
    torch.testing.assert_close(batch["latents"][2], examples[1]["source_latents"])
    # Flow matching: x_t = (1 - s) x0 + s noise and the target noise - x0 give back x0 = x_t - s * target.
    sigma = batch["timesteps"][3] / 1000
    torch.testing.assert_close(batch["latents"][3] - sigma * targets[3], examples[1]["latents"], atol=1e-5, rtol=0)


def test_draws_are_a_pure_function_of_seed_and_batch_index(tokenizer):
    first, second = build_collator(tokenizer), build_collator(tokenizer)
    second.num_batches = 5
    one = [first(documents()) for _ in range(6)][5]
    again = second(documents())
    torch.testing.assert_close(one["timesteps"], again["timesteps"])
    torch.testing.assert_close(one["latents"], again["latents"])
    assert not torch.equal(first(documents())["timesteps"], one["timesteps"])


def test_text_dropout_removes_the_text_of_documents_with_a_noised_image(tokenizer):
    collator = build_collator(tokenizer, dropout=1.0)
    batch = collator(documents(3))
    block = collator.processor.image_block(4)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for row in (0, 1):  # the document and the edit keep their images, lose their texts
        expected = [bos, *block, *block, eos]
        assert batch["input_ids"][row, : len(expected)].tolist() == expected
        assert batch["attention_mask"][row].sum() == len(expected)
    text = collator.processor.encode_parts([documents(3)[2]["text"]], add_eos=True)
    assert batch["input_ids"][2, : len(text)].tolist() == text  # a text-only row keeps its text


def test_loss_covers_the_noised_images_only_and_packing_gives_the_padded_loss(tokenizer):
    model = build_model(tokenizer)
    padded = build_collator(tokenizer)(documents())
    length = padded["input_ids"].shape[1]
    packed = build_collator(tokenizer, max_sequence_length=2 * length)(documents())
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    with torch.no_grad():
        expected, actual = model(**padded), model(**packed)
    for key in ("loss", "lm_loss", "diffusion_loss"):
        torch.testing.assert_close(getattr(actual, key), getattr(expected, key), rtol=1e-6, atol=1e-6, msg=key)
    noised = [index for index, target in enumerate(padded["diffusion_targets"]) if target is not None]
    assert len(noised) == 4 and len(padded["diffusion_targets"]) == 8
    per_image = [
        (expected.diffusion_predictions[index] - padded["diffusion_targets"][index]).pow(2).mean() for index in noised
    ]
    torch.testing.assert_close(expected.diffusion_loss, torch.stack(per_image).mean())


def test_images_of_mixed_sizes(tokenizer):
    collator = build_collator(tokenizer, patch_size=2)
    segments = [{"latents": latents(0, 4, 6), "noised": False}, "make it red", {"latents": latents(1, 6, 4)}]
    batch = collator([{"segments": segments}, {"source_latents": latents(2), "text": "x", "latents": latents(3)}])
    assert [tuple(image.shape) for image in batch["latents"]] == [(4, 4, 6), (4, 6, 4), (4, 4, 4), (4, 4, 4)]
    assert [target is None for target in batch["diffusion_targets"]] == [True, False, True, False]
    assert (batch["input_ids"] == collator.processor.image_token_id).sum() == 6 + 6 + 4 + 4
    model = build_model(tokenizer, max_latent_size=6)
    with torch.no_grad():
        assert torch.isfinite(model(**batch).diffusion_loss)


def test_pairs_in_a_document_batch_keep_their_draws_layout(tokenizer):
    """A caption pair collated beside a document becomes `[text, image]` (noised, full range) or `[image, text]`."""
    collator = build_collator(tokenizer)
    batch = collator([{"text": CAPTIONS[0], "latents": latents(0)}, documents(1)[0]])
    assert batch["latents"].shape == (3, 4, 4, 4)
    assert batch["diffusion_targets"][0] is not None and batch["diffusion_targets"][1] is None


def test_a_document_longer_than_the_context_is_cut_in_its_text(tokenizer):
    collator = build_collator(tokenizer, max_length=16)
    long = " ".join(CAPTIONS * 3)
    batch = collator([{"source_latents": latents(0), "text": long, "latents": latents(1)}])
    assert batch["input_ids"].shape[1] == 16 and collator.num_truncated == 1
    assert (batch["input_ids"] == collator.processor.image_token_id).sum() == 8
    with pytest.raises(ValueError, match="cannot hold a training document"):
        build_collator(tokenizer, max_length=8)([{"source_latents": latents(0), "text": "x", "latents": latents(1)}])


def test_a_document_over_the_limit_is_cut_there_and_keeps_whole_images_only(tokenizer):
    """`[text, image, text, image]` in 16 tokens: the prefix that fits is kept, the first text cut within it if
    needed; an image that does not fit whole is dropped with everything after it (no target, no latents); a cut
    document gets no `[eos]` (it does not end there)."""
    processor_ids = build_collator(tokenizer).processor
    first = "a red circle"
    used = 2 + len(processor_ids.encode_text(first)) + 6  # bos, eos, the text, the first image's block
    collator = build_collator(tokenizer, max_length=used + 3, clean_image_probability=0.0)
    document = {"segments": [first, {"latents": latents(0)}, " ".join(CAPTIONS), {"latents": latents(1)}]}
    batch = collator([document])
    assert collator.num_truncated == 1 and batch["input_ids"].shape == (1, used + 3)
    assert batch["latents"].shape == (1, 4, 4, 4) and batch["diffusion_targets"].shape == (1, 4, 4, 4)
    second_text = processor_ids.encode_text(" ".join(CAPTIONS))[:4]
    assert batch["input_ids"][0, used - 1 :].tolist() == second_text  # cut within, up to the limit: no [eos]
    assert tokenizer.eos_token_id not in batch["input_ids"][0].tolist()
    # Too short for a first image of 4x8 latents (8 patches of 2x2): the text before it alone (cut), no image.
    short = build_collator(tokenizer, max_length=8, patch_size=2)
    big = latents(1, 4, 8)
    batch = short([{"segments": [{"latents": big}, "x"]}, {"segments": [" ".join(CAPTIONS), {"latents": big}]}])
    assert "latents" not in batch and short.num_truncated == 2 and batch["input_ids"].shape == (2, 8)


def test_a_cut_that_ends_a_document_on_a_drawn_clean_image_noises_it(tokenizer):
    """At probability 1 the first image is drawn clean (context for what follows); a limit that drops everything
    after it makes it the last part, which is then noised (clean, it would train nothing). A clean image the example
    asks for stays clean."""
    processor = build_collator(tokenizer).processor
    first = "a red circle"
    used = 2 + len(processor.encode_text(first)) + 6  # bos, eos, the text, the first image's block
    unset = {"segments": [first, {"latents": latents(0)}, {"latents": latents(1)}]}
    whole = build_collator(tokenizer, clean_image_probability=1.0)([unset])
    assert [target is None for target in whole["diffusion_targets"]] == [True, False]
    cut = build_collator(tokenizer, max_length=used, clean_image_probability=1.0)([unset])
    assert cut["diffusion_targets"].shape == (1, 4, 4, 4) and (cut["timesteps"] > 0).all()
    given = {"segments": [first, {"latents": latents(0), "noised": False}, {"latents": latents(1)}]}
    kept = build_collator(tokenizer, max_length=used)([given])
    assert kept["diffusion_targets"] == [None] and (kept["timesteps"] == 0).all()


def test_text_dropout_that_ends_a_document_on_a_drawn_clean_image_noises_it(tokenizer):
    """A document that ends in text: at probability 1 every image but the last part is drawn clean; dropping the texts
    can make a drawn-clean image the last part, which is then noised (clean, it would train nothing)."""
    document = {"segments": ["a", {"latents": latents(0)}, "b", {"latents": latents(1)}, "c"]}
    kept = build_collator(tokenizer, clean_image_probability=1.0)([document])
    assert kept["diffusion_targets"] == [None, None] and (kept["timesteps"] == 0).all()
    given = {"segments": ["a", {"latents": latents(0)}, "b", {"latents": latents(1), "noised": True}, "c"]}
    dropped = build_collator(tokenizer, dropout=1.0, clean_image_probability=1.0)([given])
    assert [target is None for target in dropped["diffusion_targets"]] == [True, False]  # texts dropped, one noised
    # No noised image: the texts stay (they are all the document trains). The first image noised and the second
    # drawn clean: dropping the texts leaves the second last, and it is noised.
    both = {"segments": ["a", {"latents": latents(0)}, "b", {"latents": latents(1), "noised": False}, "c"]}
    assert build_collator(tokenizer, dropout=1.0, clean_image_probability=1.0)([both])["diffusion_targets"] == [
        None, None]  # fmt: skip
    last_drawn = {"segments": ["a", {"latents": latents(0), "noised": True}, "b", {"latents": latents(1)}, "c"]}
    batch = build_collator(tokenizer, dropout=1.0, clean_image_probability=1.0)([last_drawn])
    assert [target is None for target in batch["diffusion_targets"]] == [False, False]


def test_unset_images_are_kept_clean_with_the_drawn_probability(tokenizer):
    """A document image whose `noised` is unset (a cached interleaved document): at probability 0 every one is noised
    and the batch equals the one with `noised=True` given (nothing more drawn); at 1 every one is clean but a
    document's last part; at 0.5 some of each, the same on every call for the same batch index."""
    unset = [
        {"segments": ["a", {"latents": latents(index)}, "b", {"latents": latents(50 + index)}]} for index in range(8)
    ]
    given = [
        {"segments": [part if isinstance(part, str) else {**part, "noised": True} for part in example["segments"]]}
        for example in unset
    ]
    paper = build_collator(tokenizer, clean_image_probability=0.0)(unset)
    explicit = build_collator(tokenizer)(given)
    for key in ("input_ids", "latents", "timesteps", "diffusion_targets"):
        torch.testing.assert_close(paper[key], explicit[key], rtol=0, atol=0, msg=key)
    clean = build_collator(tokenizer, clean_image_probability=1.0)(unset)
    # Every image clean but the documents' last parts, which would train nothing clean.
    assert [target is None for target in clean["diffusion_targets"]] == [True, False] * 8
    trailing_text = [{"segments": [*example["segments"], "end"]} for example in unset]
    clean = build_collator(tokenizer, clean_image_probability=1.0)(trailing_text)
    assert all(target is None for target in clean["diffusion_targets"]) and (clean["timesteps"] == 0).all()
    with torch.no_grad():  # no noised image: the batch trains its text alone
        output = build_model(tokenizer)(**clean)
    assert torch.isfinite(output.loss) and not output.diffusion_loss
    half = build_collator(tokenizer, clean_image_probability=0.5)
    kept = [target is None for target in half(unset)["diffusion_targets"]]
    assert 0 < sum(kept) < len(kept)
    again = build_collator(tokenizer, clean_image_probability=0.5)
    assert [target is None for target in again(unset)["diffusion_targets"]] == kept
    with pytest.raises(ValueError, match="clean_image_probability"):
        build_collator(tokenizer, clean_image_probability=1.5)
