"""TransfusionProcessor (text + image layout, pixel values) and TransfusionDataCollator (training batches)."""

from __future__ import annotations

import os
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDPMScheduler
from transformers import AutoProcessor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pipeline_components import CAPTIONS, get_tokenizer, get_transformer, get_vae  # noqa: E402
from transfusion_hf.data.collator import TransfusionDataCollator, first_fit_rows, pack_sequences  # noqa: E402
from transfusion_hf.noising import TransfusionNoiser  # noqa: E402
from transfusion_hf.processing_transfusion import (  # noqa: E402
    TransfusionProcessor,
    add_special_tokens,
    images_to_pixel_values,
    pad_sequences,
    special_token_ids,
)

NUM_IMAGE_TOKENS = 4
IMAGE_SIZE = 8


@pytest.fixture(scope="module")
def processor():
    return TransfusionProcessor(get_tokenizer(), image_size=IMAGE_SIZE, num_image_tokens=NUM_IMAGE_TOKENS)


def text_ids(processor, text):
    return processor.tokenizer(text, add_special_tokens=False).input_ids


# ------------------------------------------------------------------------------------------------- layout
def test_markers_become_image_blocks_in_place(processor):
    tok = processor.tokenizer
    block = [processor.boi_token_id] + [processor.image_token_id] * NUM_IMAGE_TOKENS + [processor.eoi_token_id]
    assert processor.image_block() == block
    image = PIL.Image.new("RGB", (8, 8))
    out = processor("a red <image> circle then <image>", images=[image, image])
    expected = [tok.bos_token_id, *text_ids(processor, "a red"), *block, *text_ids(processor, "circle then"), *block]
    assert out["input_ids"].tolist() == [expected]
    assert out["attention_mask"].tolist() == [[1] * len(expected)]
    assert out["pixel_values"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    # Image first, and no text at all.
    out = processor("<image> after", images=image, add_eos=False)
    assert out["input_ids"][0].tolist() == [tok.bos_token_id, *block, *text_ids(processor, "after")]
    assert processor("plain text")["input_ids"][0].tolist() == [tok.bos_token_id, *text_ids(processor, "plain text")]
    assert "pixel_values" not in processor("plain text")


def test_encode_parts_with_eos(processor):
    tok = processor.tokenizer
    ids = processor.encode_parts(["a cat", None], add_bos=True, add_eos=True)
    assert ids == [tok.bos_token_id, *text_ids(processor, "a cat"), *processor.image_block(), tok.eos_token_id]
    assert processor.encode_parts([None], add_bos=False) == processor.image_block()


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padding_and_attention_mask(processor, padding_side):
    image = PIL.Image.new("RGB", (8, 8))
    texts = ["a small red circle in the top left <image>", "<image>"]
    out = processor(texts, images=[[image], [image]], padding_side=padding_side)
    ids, mask = out["input_ids"], out["attention_mask"]
    long_row = processor.encode_parts(processor.split_text(texts[0]))
    short_row = processor.encode_parts([None])
    assert ids.shape == (2, len(long_row)) and mask.shape == ids.shape
    pad = len(long_row) - len(short_row)
    assert ids[0].tolist() == long_row and mask[0].tolist() == [1] * len(long_row)
    pad_id = processor.tokenizer.pad_token_id
    if padding_side == "left":
        assert ids[1].tolist() == [pad_id] * pad + short_row
        assert mask[1].tolist() == [0] * pad + [1] * len(short_row)
    else:
        assert ids[1].tolist() == short_row + [pad_id] * pad
        assert mask[1].tolist() == [1] * len(short_row) + [0] * pad
    with pytest.raises(ValueError, match="padding_side"):
        processor(texts, images=[image, image], padding_side="middle")


def test_pad_sequences():
    ids, mask = pad_sequences([[5, 6, 7], [8]], pad_token_id=0, padding_side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_sequences([[5, 6, 7], [8]], pad_token_id=0, padding_side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_marker_image_count_mismatch_names_counts(processor):
    image = PIL.Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match=r"2 image markers.*1 images"):
        processor("<image> and <image>", images=[image])
    with pytest.raises(ValueError, match=r"0 image markers.*1 images"):
        processor("no marker", images=image)
    with pytest.raises(ValueError, match=r"1 image markers.*0 images"):
        processor("<image>")


def test_images_given_per_text_must_match_each_texts_markers(processor):
    image = PIL.Image.new("RGB", (8, 8))
    # Same total (2 markers, 2 images) but the first text's image is given to the second one.
    with pytest.raises(ValueError, match=r"text\[0\] holds 2 image markers .* images\[0\] has 1 images"):
        processor(["<image> <image>", "none"], images=[[image], [image]])
    with pytest.raises(ValueError, match=r"`images` holds 1 lists \(one per text\) but 2 texts"):
        processor(["<image> <image>", "none"], images=[[image, image]])
    out = processor(["<image> <image>", "none"], images=[[image, image], []])
    assert out["pixel_values"].shape[0] == 2


def test_bad_text_and_image_types_name_the_value(processor):
    with pytest.raises(ValueError, match=r"text\[1\]=3"):
        processor(["a cat", 3])
    with pytest.raises(ValueError, match=r"images\[0\] has type str"):
        processor("a <image>", images=["cat.png"])


def test_decode_drops_special_tokens(processor):
    image = PIL.Image.new("RGB", (8, 8))
    ids = processor(["a red <image> circle", "blue"], images=[image], add_eos=True)["input_ids"]
    eos = processor.tokenizer.eos_token_id
    assert ids[0, -1] == eos and (ids[1] == eos).sum() == 1
    assert eos not in processor("blue")["input_ids"][0].tolist()
    assert processor.decode(ids[0]) == "a red circle"
    assert processor.batch_decode(ids) == ["a red circle", "blue"]
    assert "<boi>" in processor.decode(ids[0], skip_special_tokens=False)


# ------------------------------------------------------------------------------------------------- images
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "LA", "1", "CMYK"])
@pytest.mark.parametrize("size", [(8, 8), (13, 7), (5, 11)])
def test_pil_images_of_any_mode_and_size(processor, mode, size):
    image = PIL.Image.new("RGB", size, (200, 30, 90)).convert(mode)
    pixels = processor.preprocess_images(image)
    assert pixels.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1


def test_pixel_values_are_exact_for_uint8_and_center_cropped():
    array = np.random.RandomState(0).randint(0, 256, (8, 8, 3)).astype(np.uint8)
    pixels = images_to_pixel_values(array, 8)
    torch.testing.assert_close(pixels[0], torch.from_numpy(array / 127.5 - 1).permute(2, 0, 1).float())
    # "crop" keeps the aspect ratio: a white stripe on the far left of a wide image is cut off.
    wide = np.zeros((8, 16, 3), np.uint8)
    wide[:, :3] = 255
    assert images_to_pixel_values(wide, 8).max() == -1
    assert images_to_pixel_values(wide, 8, resize_mode="default").max() > 0


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((9, 6, 3), np.uint8),
        np.full((6, 6), 255, np.uint8),
        np.zeros((6, 9, 1), np.uint8),
        np.zeros((6, 6, 4), np.uint8),
        np.random.RandomState(0).rand(10, 10, 3),
        np.random.RandomState(0).rand(10, 10).astype(np.float32),
    ],
    ids=["uint8-hwc", "uint8-hw", "uint8-hw1", "uint8-rgba", "float64", "float32-hw"],
)
def test_numpy_images(array):
    pixels = images_to_pixel_values([array, array], IMAGE_SIZE)
    assert pixels.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert pixels.min() >= -1 and pixels.max() <= 1
    if array.dtype != np.uint8:
        assert pixels.mean().item() == pytest.approx(array.mean() * 2 - 1, abs=0.05)


def test_tensor_images_in_both_ranges():
    signed = torch.linspace(-1, 1, 3 * 8 * 8).reshape(3, 8, 8)
    torch.testing.assert_close(images_to_pixel_values(signed, 8)[0], signed, atol=1 / 255 + 1e-6, rtol=0)
    unit = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(images_to_pixel_values(unit, 8)[0], unit * 2 - 1, atol=1 / 255 + 1e-6, rtol=0)
    gray = images_to_pixel_values(torch.rand(1, 5, 7), 8)
    assert gray.shape == (1, 3, 8, 8) and torch.equal(gray[0, 0], gray[0, 1])
    assert images_to_pixel_values(torch.rand(4, 8, 8), 8).shape == (1, 3, 8, 8)
    with pytest.raises(ValueError, match="expected \\(C, H, W\\)"):
        images_to_pixel_values([torch.rand(1, 3, 8, 8)], 8)
    with pytest.raises(ValueError, match="expected \\(C, H, W\\)"):
        images_to_pixel_values(torch.rand(8, 8), 8)
    with pytest.raises(ValueError, match="images\\[0\\] has type"):
        images_to_pixel_values(["not an image"], 8)


def test_batched_tensors_and_arrays_are_several_images(processor):
    batch = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    pixels = images_to_pixel_values(batch, 8)
    assert pixels.shape == (3, 3, 8, 8)
    torch.testing.assert_close(pixels, batch * 2 - 1, atol=1 / 255 + 1e-6, rtol=0)
    arrays = (batch.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    torch.testing.assert_close(images_to_pixel_values(arrays, 8), pixels, atol=1 / 255 + 1e-6, rtol=0)
    out = processor(["<image> <image>", "<image>"], images=batch)
    assert out["pixel_values"].shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)


# ---------------------------------------------------------------------------------------- save / tokenizer
def test_save_and_load_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = TransfusionProcessor.from_pretrained(tmp_path)
    assert (loaded.image_size, loaded.num_image_tokens, loaded.resize_mode) == (IMAGE_SIZE, NUM_IMAGE_TOKENS, "crop")
    for name in ("boi_token_id", "eoi_token_id", "image_token_id"):
        assert getattr(loaded, name) == getattr(processor, name)
    assert loaded.tokenizer.pad_token_id == processor.tokenizer.pad_token_id
    image = PIL.Image.new("RGB", (8, 8))
    a = processor(["a cat <image>", "dog"], images=[image], padding_side="left")
    b = loaded(["a cat <image>", "dog"], images=[image], padding_side="left")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])


def test_auto_processor_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is TransfusionProcessor
    assert (loaded.image_size, loaded.num_image_tokens, loaded.resize_mode) == (IMAGE_SIZE, NUM_IMAGE_TOKENS, "crop")
    image = np.random.RandomState(0).randint(0, 256, (8, 8, 3)).astype(np.uint8)
    a = processor(["a cat <image>", "dog"], images=[image])
    b = loaded(["a cat <image>", "dog"], images=[image])
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_special_tokens_and_pad_are_added_to_a_bare_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel()
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(CAPTIONS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    size = len(tokenizer)
    assert tokenizer.pad_token is None and "<boi>" not in tokenizer.get_vocab()

    processor = TransfusionProcessor(tokenizer, num_image_tokens=2)
    assert len(tokenizer) == size + 4
    ids = {processor.boi_token_id, processor.eoi_token_id, processor.image_token_id, tokenizer.pad_token_id}
    assert len(ids) == 4 and min(ids) >= size
    assert tokenizer.pad_token is not None
    out = processor("hi <image> there", images=np.zeros((4, 4, 3), np.uint8))
    assert out["input_ids"][0].tolist().count(processor.image_token_id) == 2
    # Each special token is one id, and they vanish on decode.
    assert processor.decode(out["input_ids"][0]) == "hi there"
    # A second processor on the same tokenizer adds nothing.
    TransfusionProcessor(tokenizer, num_image_tokens=2)
    assert len(tokenizer) == size + 4


def test_invalid_arguments():
    tokenizer = get_tokenizer()
    with pytest.raises(ValueError, match="resize_mode"):
        TransfusionProcessor(tokenizer, resize_mode="zoom")
    with pytest.raises(ValueError, match="num_image_tokens"):
        TransfusionProcessor(tokenizer, num_image_tokens=0)


# ------------------------------------------------------------------------------------------- into the model
def mixed_images() -> list:
    """A PIL image of another size and mode, and a uint8 pixel array."""
    return [PIL.Image.new("L", (20, 12), 200), np.random.RandomState(1).randint(0, 256, (8, 8, 3)).astype(np.uint8)]


def test_processor_output_feeds_a_pixel_space_model():
    tokenizer = get_tokenizer()
    model = get_transformer(tokenizer, latent_channels=3)  # 4x4 pixels, 4 patches per image
    processor = TransfusionProcessor(tokenizer, image_size=4, num_image_tokens=model.config.num_patches)
    inputs = processor(text=["a red circle <image>", "<image> a blue square on black"], images=mixed_images())
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values", "timesteps"}
    assert inputs["pixel_values"].shape == (2, 3, 4, 4) and torch.equal(inputs["timesteps"], torch.zeros(2))
    with torch.no_grad():
        out = model(**inputs, labels=inputs["input_ids"], diffusion_targets=torch.ones(2, 3, 4, 4))
        as_latents = model(
            inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            latents=inputs["pixel_values"],
            timesteps=inputs["timesteps"],
        )
    assert torch.isfinite(out.loss) and out.lm_loss > 0 and out.diffusion_loss > 0
    assert torch.equal(out.diffusion_predictions, as_latents.diffusion_predictions)
    # Captioning straight from the processor's output (the images are clean context).
    prompt = processor(text="<image> a", images=mixed_images()[:1], padding_side="left")
    kwargs = {"max_new_tokens": 3, "do_sample": False, "num_beams": 2, "num_return_sequences": 2}
    generated = model.generate(**prompt, **kwargs)
    latents = prompt.pop("pixel_values")
    assert torch.equal(generated, model.generate(**prompt, latents=latents, **kwargs))
    assert generated.shape == (2, prompt["input_ids"].shape[1] + 3)


def test_processor_output_feeds_a_latent_model_through_a_vae():
    tokenizer = get_tokenizer()
    model = get_transformer(tokenizer)  # 4-channel 4x4 latents
    vae = get_vae()  # 8x8 images -> 4x4 latents
    processor = TransfusionProcessor(tokenizer, image_size=8, num_image_tokens=model.config.num_patches)
    inputs = processor(text=["a red circle <image>", "<image> a blue square"], images=mixed_images())
    # Without the VAE step the model says what to do.
    with pytest.raises(ValueError, match=r"`pixel_values` has shape \(2, 3, 8, 8\).*vae\.encode"):
        model(**inputs)
    with torch.no_grad():
        latents = vae.encode(inputs.pop("pixel_values")).latent_dist.mode()
        inputs["latents"] = (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
        out = model(**inputs, labels=inputs["input_ids"], diffusion_targets=torch.zeros_like(inputs["latents"]))
    assert inputs["latents"].shape == (2, 4, 4, 4)
    assert torch.isfinite(out.loss) and out.lm_loss > 0 and out.diffusion_loss > 0
    assert out.diffusion_predictions.shape == (2, 4, 4, 4)


# ------------------------------------------------------------------------------------------------ collator
LATENT_SHAPE = (4, 2, 2)


def make_collator(processor, seed=0, **noiser_kwargs):
    noiser = TransfusionNoiser(DDPMScheduler(clip_sample=False), **noiser_kwargs)
    return TransfusionDataCollator(processor, noiser, seed=seed)


def make_examples(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        {"text": CAPTIONS[index % len(CAPTIONS)], "latents": torch.randn(LATENT_SHAPE, generator=generator)}
        for index in range(count)
    ]


def classify(processor, row_ids, row_mask):
    """'image_first', 'caption_first' or 'dropped' (caption-first with an empty caption) from the ids alone."""
    ids = row_ids[row_mask.bool()].tolist()
    block = processor.image_block()
    assert ids[0] == processor.tokenizer.bos_token_id and ids[-1] == processor.tokenizer.eos_token_id
    if ids[1 : 1 + len(block)] == block:
        return "dropped" if len(ids) == len(block) + 2 else "image_first"
    assert ids[-1 - len(block) : -1] == block
    return "caption_first"


def test_collator_keys_and_shapes(processor):
    batch = make_collator(processor)(make_examples(6))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "latents", "timesteps", "diffusion_targets"}
    batch_size, length = batch["input_ids"].shape
    assert batch_size == 6 and batch["attention_mask"].shape == (6, length) and batch["labels"].shape == (6, length)
    assert batch["latents"].shape == (6, *LATENT_SHAPE) and batch["diffusion_targets"].shape == (6, *LATENT_SHAPE)
    assert batch["timesteps"].shape == (6,) and batch["timesteps"].dtype == torch.long
    assert (batch["input_ids"] == processor.image_token_id).sum(dim=1).tolist() == [NUM_IMAGE_TOKENS] * 6
    # Labels: the ids, and -100 exactly at padding.
    padding = batch["attention_mask"] == 0
    assert padding.any()
    assert (batch["labels"][padding] == -100).all()
    assert torch.equal(batch["labels"][~padding], batch["input_ids"][~padding])
    # Right padding for training.
    assert (batch["attention_mask"][:, 0] == 1).all()


def test_collator_layout_statistics_and_timestep_limit(processor):
    collator = make_collator(processor)
    examples = make_examples(100)
    counts = {"image_first": 0, "caption_first": 0, "dropped": 0}
    image_first_t, caption_first_t = [], []
    for _ in range(20):  # 2000 pairs (fixed seed: the test is deterministic, the bounds are ~4.5 sigma)
        batch = collator(examples)
        for row in range(len(examples)):
            kind = classify(processor, batch["input_ids"][row], batch["attention_mask"][row])
            counts[kind] += 1
            (image_first_t if kind == "image_first" else caption_first_t).append(int(batch["timesteps"][row]))
    total = sum(counts.values())
    # Image-first p=0.2 (sigma ~0.009), dropout p=0.1 of ~1600 caption-first pairs (sigma ~0.0075).
    assert abs(counts["image_first"] / total - 0.2) < 0.04
    caption_first = counts["caption_first"] + counts["dropped"]
    assert abs(counts["dropped"] / caption_first - 0.1) < 0.034
    assert max(image_first_t) <= 500 and min(image_first_t) >= 0
    assert max(caption_first_t) > 900 and max(caption_first_t) <= 999
    # Image-first pairs are never caption-dropped: every image-first row had text after the image (checked in
    # `classify`), and the noiser's draw agrees.
    image_first, dropped = collator.noiser.sample_layout(10000, torch.Generator().manual_seed(1))
    assert not (image_first & dropped).any()
    assert abs(dropped.float().mean().item() - 0.1 * 0.8) < 0.015


def test_collator_is_deterministic_for_a_seed(processor):
    examples = make_examples(8)
    first = make_collator(processor, seed=3)
    batches = [first(examples) for _ in range(3)]
    second = make_collator(processor, seed=3)
    for batch in batches:
        again = second(examples)
        for key in batch:
            assert torch.equal(batch[key], again[key]), key
    # Batches differ from one another, and from another seed.
    assert not torch.equal(batches[0]["timesteps"], batches[1]["timesteps"])
    assert not torch.equal(batches[0]["timesteps"], make_collator(processor, seed=4)(examples)["timesteps"])
    # A resumed run (num_batches set to the batches already drawn) draws what the uninterrupted run drew.
    resumed = make_collator(processor, seed=3)
    resumed.num_batches = 2
    assert torch.equal(resumed(examples)["latents"], batches[2]["latents"])


def test_collator_targets_match_the_noiser(processor):
    collator = make_collator(processor, seed=5, image_first_probability=0.0, caption_dropout_probability=0.0)
    examples = make_examples(4)
    batch = collator(examples)
    clean = torch.stack([example["latents"] for example in examples])
    # epsilon: x_t = sqrt(a) x0 + sqrt(1 - a) eps with the target eps.
    alphas = collator.noiser.scheduler.alphas_cumprod[batch["timesteps"]][:, None, None, None]
    torch.testing.assert_close(
        batch["latents"], alphas.sqrt() * clean + (1 - alphas).sqrt() * batch["diffusion_targets"]
    )
    assert all(
        classify(processor, i, m) == "caption_first" for i, m in zip(batch["input_ids"], batch["attention_mask"])
    )


def test_collator_truncates_long_captions_and_counts_them(processor):
    """A caption longer than the context is cut (the image block, BOS and EOS kept), counted, and trained on."""
    noiser = TransfusionNoiser(DDPMScheduler(clip_sample=False), image_first_probability=0.5)
    long_caption = " ".join(CAPTIONS)
    examples = [{"text": long_caption, "latents": torch.zeros(LATENT_SHAPE)}, *make_examples(3)]
    short_ids = [len(text_ids(processor, example["text"])) for example in examples[1:]]
    limit = NUM_IMAGE_TOKENS + 4 + max(short_ids)  # <bos> <boi> <image>*N <eoi> <eos> + the longest short caption
    assert len(text_ids(processor, long_caption)) > max(short_ids)
    collator = TransfusionDataCollator(processor, noiser, max_length=limit)
    batch = collator(examples)
    assert batch["input_ids"].shape[1] == limit and collator.num_truncated == 1
    row = batch["input_ids"][0].tolist()
    assert row[0] == processor.tokenizer.bos_token_id and row[-1] == processor.tokenizer.eos_token_id
    assert row.count(processor.image_token_id) == NUM_IMAGE_TOKENS
    caption = [token for token in row[1:-1] if token not in processor.image_block()]
    assert caption == text_ids(processor, long_caption)[: len(caption)] and len(caption) == max(short_ids)
    collator(examples[1:])
    assert collator.num_truncated == 1  # the short captions are left whole


def test_collator_refuses_a_limit_below_one_image(processor):
    noiser = TransfusionNoiser(DDPMScheduler(clip_sample=False))
    for name in ("max_length", "max_sequence_length"):
        with pytest.raises(ValueError, match=f"`{name}`={NUM_IMAGE_TOKENS + 3} cannot hold a training sequence"):
            TransfusionDataCollator(processor, noiser, **{name: NUM_IMAGE_TOKENS + 3})
    with pytest.raises(ValueError, match="`max_sequence_length`=64 is longer than `max_length`=32"):
        TransfusionDataCollator(processor, noiser, max_length=32, max_sequence_length=64)
    with pytest.raises(ValueError, match="`max_sequence_length` must be a positive integer"):
        TransfusionDataCollator(processor, noiser, max_sequence_length=0)


def test_collator_text_only_examples(processor):
    """Examples without latents are text-only rows (`[bos] text [eos]`, never dropped); the images of the others
    keep the reading order."""
    collator = make_collator(processor, seed=2, caption_dropout_probability=1.0, image_first_probability=0.0)
    examples = make_examples(4)
    examples[1] = {"text": "a text-only document"}
    examples[3] = {"text": "another one", "latents": None}
    batch = collator(examples)
    bos, eos = processor.tokenizer.bos_token_id, processor.tokenizer.eos_token_id
    for row in (1, 3):
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        assert ids == [bos, *text_ids(processor, examples[row]["text"]), eos]
    assert (batch["input_ids"] == processor.image_token_id).sum(dim=1).tolist() == [NUM_IMAGE_TOKENS, 0] * 2
    assert batch["latents"].shape == (2, *LATENT_SHAPE) and batch["timesteps"].shape == (2,)
    # Without any image the batch has no image keys (the model takes it as text-only).
    assert set(collator([examples[1], examples[3]])) == {"input_ids", "attention_mask", "labels"}


def test_first_fit_rows():
    assert first_fit_rows([5, 4, 3, 2, 6], capacity=8) == [[0, 2], [1, 3], [4]]
    assert first_fit_rows([8, 1], capacity=8) == [[0], [1]]
    with pytest.raises(ValueError, match="Sequence 1 has 9 tokens, more than the row length 8"):
        first_fit_rows([1, 9], capacity=8)


def test_pack_sequences_positions_and_labels():
    input_ids, labels, position_ids, rows = pack_sequences([[1, 5, 6, 2], [1, 7, 2], [1, 8, 9, 9, 2]], 0, 8)
    assert rows == [[0, 1], [2]]
    assert input_ids.tolist() == [[1, 5, 6, 2, 1, 7, 2, 0], [1, 8, 9, 9, 2, 0, 0, 0]]
    assert position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 2, 3, 4, 0, 1, 2]]
    # No label at the first token of a sequence (never predicted from the one before) nor at padding.
    assert labels.tolist() == [[-100, 5, 6, 2, -100, 7, 2, -100], [-100, 8, 9, 9, 2, -100, -100, -100]]


@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_packed_collator_holds_the_padded_batch(processor, snr_gamma):
    """Packing changes only the layout: the same sequences, and each image with its own noise, timestep and target,
    in the reading order of the packed rows."""
    examples = make_examples(10, seed=1)
    for index, example in enumerate(examples):
        example["text"] += " and more" * (index % 4) + f" {index}"  # distinct documents of mixed lengths
    examples[2] = {"text": "text only"}
    kwargs = {"image_first_probability": 0.5, "caption_dropout_probability": 0.0, "snr_gamma": snr_gamma}
    padded = make_collator(processor, seed=7, **kwargs)(examples)
    packer = make_collator(processor, seed=7, **kwargs)
    packer.max_sequence_length = length = padded["input_ids"].shape[1] * 3 // 2
    packed = packer(examples)
    assert "attention_mask" not in packed and packed["input_ids"].shape[1] == length and packer.num_truncated == 0
    assert packed["input_ids"].shape[0] < len(examples)  # several sequences per row

    def documents(input_ids, starts):
        """The id lists of each document, cut at the positions where `starts` is True."""
        found = []
        for row, row_starts in zip(input_ids.tolist(), starts.tolist()):
            for token, start in zip(row, row_starts):
                if start:
                    found.append([])
                found[-1].append(token)
        return found

    real = padded["attention_mask"].bool()
    padded_documents = [row[mask].tolist() for row, mask in zip(padded["input_ids"], real)]
    packed_documents = documents(packed["input_ids"], packed["position_ids"] == 0)
    pad = processor.tokenizer.pad_token_id
    packed_documents = [document for document in packed_documents if set(document) != {pad}]
    assert sorted(packed_documents) == sorted(padded_documents)
    # Images: example i's image is the k-th image of the padded batch; find where its document went.
    image_rows = [index for index, document in enumerate(padded_documents) if processor.image_token_id in document]
    order = [image_rows.index(padded_documents.index(document)) for document in packed_documents
             if processor.image_token_id in document]  # fmt: skip
    keys = ["latents", "timesteps", "diffusion_targets"] + (["diffusion_loss_weights"] if snr_gamma else [])
    for key in keys:
        assert torch.equal(packed[key], padded[key][order]), key
    assert order != sorted(order)  # first-fit moved images: the reordering is exercised


def test_special_token_ids_are_the_config_fields():
    tokenizer = get_tokenizer()
    ids = special_token_ids(tokenizer)
    processor = TransfusionProcessor(tokenizer, num_image_tokens=2)
    assert ids == {name: getattr(processor, name) for name in ("boi_token_id", "eoi_token_id", "image_token_id")}
    assert [tokenizer.convert_ids_to_tokens(ids[name]) for name in ids] == ["<boi>", "<eoi>", "<image>"]
    # Other token strings, as the processor takes them.
    tokenizer.add_special_tokens({"additional_special_tokens": ["<img>"]})
    assert special_token_ids(tokenizer, image_token="<img>")["image_token_id"] == tokenizer.convert_tokens_to_ids(
        "<img>"
    )


def test_special_token_ids_of_a_tokenizer_without_them_raises_naming_the_token():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    for unk_token in ("<unk>", None):  # a missing token maps to the unknown token's id, or to None without one
        vocab = {"<unk>": 0, "a": 1, "<boi>": 2, "<eoi>": 3}
        backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=unk_token)
        with pytest.raises(ValueError, match="no '<image>' token \\(for `image_token_id`\\).*add_special_tokens"):
            special_token_ids(tokenizer)
        add_special_tokens(tokenizer)
        assert special_token_ids(tokenizer)["image_token_id"] == len(vocab)
