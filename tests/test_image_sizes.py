"""Images of any size and aspect ratio in one model: per-image latent grids, the patch position embeddings, and
checkpoints saved before (square grids only) loading with the same outputs."""

from __future__ import annotations

from pathlib import Path

import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from transfusion_hf import TransfusionConfig, TransfusionForMixedModal
from transfusion_hf.image_grids import group_images_by_grid, placeholder_block_lengths
from transfusion_hf.image_layers import TransfusionPatchPositionEmbedding

FIXTURES = Path(__file__).parent / "fixtures"
TEXT = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 64, "max_position_embeddings": 256}  # fmt: skip
UNET = dict(latent_channels=3, latent_size=8, patch_size=4, patch_encoder="unet", unet_block_out_channels=[8, 8, 16],
            unet_norm_num_groups=4, unet_linear_shortcut=True, unet_output_shortcut=True)  # fmt: skip
LINEAR = dict(latent_channels=4, latent_size=4, patch_size=2)


def perturbed_model(embedding_type: str = "learned", encoder: dict = UNET, max_latent_size: int = 16):
    torch.manual_seed(0)
    config = TransfusionConfig(
        text_config=TEXT, max_latent_size=max_latent_size, patch_position_embedding_type=embedding_type, **encoder
    )
    model = TransfusionForMixedModal(config).eval()
    with torch.no_grad():  # the zero-initialised output layers would hide the decoder path
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    return model


def image_row(config: TransfusionConfig, text: list[int], grids: list[tuple[int, int]]) -> list[int]:
    ids = [1, *text]
    for height, width in grids:
        ids += [config.boi_token_id] + [config.image_token_id] * config.num_patches_for(height, width)
        ids += [config.eoi_token_id, 9]
    return ids


@pytest.mark.parametrize("name", ["linear", "unet"])
def test_square_checkpoints_saved_before_load_with_the_same_outputs(name):
    """Checkpoints written by the code before per-image grids (tests/fixtures/square_*, with the inputs they were run
    on and their outputs; the code files `save_pretrained` wrote beside them are left out, as this loads the package's
    class) load and give the same logits and predictions to the last bit."""
    model = TransfusionForMixedModal.from_pretrained(FIXTURES / f"square_{name}").eval()
    expected = load_file(FIXTURES / f"square_{name}" / "expected_outputs.safetensors")
    assert model.config.max_latent_side == model.config.latent_size
    # One thread, as the outputs were made: the U-Net's convolutions sum in another order on another thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            inputs = {name: expected[name] for name in ("input_ids", "latents", "timesteps")}
            output = model(**inputs)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(output.logits, expected["logits"], rtol=0, atol=0)
    torch.testing.assert_close(output.diffusion_predictions, expected["diffusion_predictions"], rtol=0, atol=0)


@pytest.mark.parametrize("embedding_type", ["learned", "factorized", "interpolated"])
@pytest.mark.parametrize("encoder", [UNET, LINEAR], ids=["unet", "linear"])
def test_mixed_sizes_in_one_batch_equal_each_image_alone(embedding_type, encoder):
    """Images of three aspect ratios in one batch (a list of latents, two rows, two images in one row) get the
    predictions each gets alone: grouping by grid and scattering back keep every image's patches together."""
    model = perturbed_model(embedding_type, encoder)
    config = model.config
    unit = config.patch_size
    grids = [(2 * unit, 2 * unit), (2 * unit, 4 * unit), (4 * unit, 2 * unit)]
    generator = torch.Generator().manual_seed(3)
    latents = [torch.randn(config.latent_channels, height, width, generator=generator) for height, width in grids]
    timesteps = torch.tensor([50.0, 400.0, 900.0])
    rows = [image_row(config, [5, 7], grids[:2]), image_row(config, [8], grids[2:])]
    length = max(len(row) for row in rows)
    input_ids = torch.tensor([row + [0] * (length - len(row)) for row in rows])
    attention_mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in rows])
    with torch.no_grad():
        together = model(input_ids=input_ids, attention_mask=attention_mask, latents=latents, timesteps=timesteps)
    assert isinstance(together.diffusion_predictions, list)
    assert [tuple(p.shape) for p in together.diffusion_predictions] == [tuple(x.shape) for x in latents]
    # Alone: the first row's images in a row of their own, each as a one-image tensor batch.
    for index in range(3):
        row = rows[0] if index < 2 else rows[1]
        context = latents[:2] if index < 2 else latents[2:]
        context_times = timesteps[:2] if index < 2 else timesteps[2:]
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([row]), latents=list(context), timesteps=context_times)
        slot = index if index < 2 else 0
        torch.testing.assert_close(together.diffusion_predictions[index], alone.diffusion_predictions[slot])
    # The loss takes the list form too.
    targets = [torch.zeros_like(x) for x in latents]
    loss = model(input_ids=input_ids, attention_mask=attention_mask, latents=latents, timesteps=timesteps,
                 diffusion_targets=targets).diffusion_loss  # fmt: skip
    expected = torch.stack([p.float().pow(2).mean() for p in together.diffusion_predictions]).mean()
    torch.testing.assert_close(loss, expected)


def test_one_tensor_of_a_non_default_grid_is_one_group():
    model = perturbed_model()
    config = model.config
    latents = torch.randn(2, 3, 8, 12)
    ids = torch.tensor([image_row(config, [5], [(8, 12)])] * 2)
    with torch.no_grad():
        output = model(input_ids=ids, latents=latents, timesteps=torch.tensor([10.0, 20.0]))
    assert output.diffusion_predictions.shape == (2, 3, 8, 12)
    assert len(group_images_by_grid(latents, 4)) == 1


def test_position_embeddings_of_each_kind():
    config = TransfusionConfig(text_config=TEXT, max_latent_size=16, **UNET)  # grids up to 4x4, default 2x2
    learned = TransfusionPatchPositionEmbedding(config)
    assert learned.weight.shape == (16, 32)
    # A smaller grid reads the top-left cells of the largest one: cell (r, c) is row r * 4 + c.
    torch.testing.assert_close(learned((2, 3)), learned.weight[[0, 1, 2, 4, 5, 6]])
    torch.testing.assert_close(learned((4, 4)), learned.weight)
    factorized = TransfusionPatchPositionEmbedding(
        TransfusionConfig(text_config=TEXT, max_latent_size=16, patch_position_embedding_type="factorized", **UNET)
    )
    assert factorized.weight.shape == (8, 32)
    torch.testing.assert_close(factorized((3, 2))[5], factorized.weight[2] + factorized.weight[4 + 1])
    interpolated = TransfusionPatchPositionEmbedding(
        TransfusionConfig(text_config=TEXT, max_latent_size=16, patch_position_embedding_type="interpolated", **UNET)
    )
    assert interpolated.weight.shape == (4, 32)  # the default 2x2 grid's table
    torch.testing.assert_close(interpolated((2, 2)), interpolated.weight)
    wide = interpolated((2, 4))
    assert wide.shape == (8, 32)
    torch.testing.assert_close(wide[0], interpolated.weight[0])  # the corners keep their vectors
    torch.testing.assert_close(wide[7], interpolated.weight[3])


def test_bad_sizes_are_refused_naming_the_field():
    with pytest.raises(
        ValueError, match=r"`max_latent_size` must be None or a multiple of `patch_size`=4 of at least"
    ):
        TransfusionConfig(text_config=TEXT, max_latent_size=10, **UNET)
    with pytest.raises(ValueError, match=r"`max_latent_size` must be .* got 4"):
        TransfusionConfig(text_config=TEXT, max_latent_size=4, **UNET)  # smaller than latent_size
    with pytest.raises(ValueError, match=r"`patch_position_embedding_type` must be one of .* got 'rope'"):
        TransfusionConfig(text_config=TEXT, patch_position_embedding_type="rope", **UNET)
    model = perturbed_model()
    config = model.config
    ids = torch.tensor([image_row(config, [5], [(8, 8), (8, 12)])])
    with pytest.raises(ValueError, match=r"`latents\[1\]` has a latent grid of 8x20: each side must be a multiple"):
        model(input_ids=ids, latents=[torch.zeros(3, 8, 8), torch.zeros(3, 8, 20)], timesteps=torch.zeros(2))
    with pytest.raises(ValueError, match=r"`latents\[1\]` has a latent grid of 8x10"):
        model(input_ids=ids, latents=[torch.zeros(3, 8, 8), torch.zeros(3, 8, 10)], timesteps=torch.zeros(2))
    # The right number of placeholders in all, but the blocks in the other order.
    with pytest.raises(ValueError, match=r"placeholder blocks of `input_ids` have \[4, 6\] positions but the images "
                       r"of `latents` have \[6, 4\] patches"):  # fmt: skip
        model(input_ids=ids, latents=[torch.zeros(3, 8, 12), torch.zeros(3, 8, 8)], timesteps=torch.zeros(2))


def test_placeholder_block_lengths_read_each_row():
    ids = torch.tensor([[1, 9, 9, 2, 9, 9, 9], [9, 9, 2, 2, 2, 2, 9]])
    assert placeholder_block_lengths(ids, 9) == [2, 3, 2, 1]


# ------------------------------------------------------------------------------------------------------ pipeline
def sizes_pipeline():
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from pipeline_components import get_scheduler, get_tokenizer, get_transformer, get_vae
    from transfusion_hf.pipeline_transfusion import TransfusionPipeline

    tokenizer = get_tokenizer()
    # Latent 4x4 by default (8x8 pixels through the 2x VAE), up to 8x8 latents (16x16 pixels), patch 2.
    transformer = get_transformer(tokenizer, "flow_prediction", max_latent_size=8)
    pipe = TransfusionPipeline(transformer, get_scheduler("flow_prediction"), get_vae(), tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_pipeline_draws_captions_and_continues_at_any_aspect_ratio():
    torch.set_num_threads(1)
    pipe = sizes_pipeline()
    prompts = ["a small red circle in the top left", "a blue square"]

    def draw(**kwargs):
        return pipe(prompts, num_inference_steps=2, generator=torch.Generator().manual_seed(0), **kwargs).images

    wide = draw(height=8, width=16, output_type="latent")
    assert wide.shape == (2, 4, 4, 8)
    torch.testing.assert_close(wide, draw(height=8, width=16, output_type="latent", use_kv_cache=False))
    tall = draw(height=16, width=8)
    assert [image.size for image in tall] == [(8, 16), (8, 16)]  # PIL: (width, height)
    assert draw(output_type="latent").shape == (2, 4, 4, 4)  # the default size is unchanged
    with pytest.raises(ValueError, match=r"`width`=24 does not fit the latent grid: .* up to 16"):
        draw(width=24)

    image = PIL.Image.new("RGB", (32, 16), (200, 30, 30))
    captions = pipe.caption([image, image], max_new_tokens=4, height=8, width=16)
    assert len(captions) == 2 and captions[0] == captions[1]
    # The caption sees the image at the asked size: 2x4 patches, not the default 2x2.
    latents = pipe.encode_images(image, height=8, width=16)
    assert latents.shape == (1, 4, 4, 8)
    outputs = pipe.generate(["a picture:", image, "and"], max_new_tokens=3, num_inference_steps=1, height=16,
                            width=8)  # fmt: skip
    assert all(isinstance(part, str) or part.size == (8, 16) for part in outputs)


def test_the_processor_lays_out_images_of_the_asked_size():
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from pipeline_components import get_tokenizer
    from transfusion_hf.processing_transfusion import TransfusionProcessor

    processor = TransfusionProcessor(get_tokenizer(), image_size=8, num_image_tokens=4)  # 4x4-pixel patches
    image = PIL.Image.new("RGB", (20, 10))
    batch = processor(text=["<image> a caption"], images=[image], height=8, width=16)
    assert batch["pixel_values"].shape == (1, 3, 8, 16)
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 8
    default = processor(text=["<image> a caption"], images=[image])
    assert default["pixel_values"].shape == (1, 3, 8, 8)
    assert int((default["input_ids"] == processor.image_token_id).sum()) == 4
    with pytest.raises(
        ValueError, match=r"`height`=8 and `width`=10: an image is not a whole number of patches of 4x4"
    ):
        processor(text=["<image>"], images=[image], height=8, width=10)


# ------------------------------------------------------------------------------------------------------ collator
def test_the_collator_lays_out_and_noises_images_of_mixed_sizes():
    """Examples with latents of three sizes: each sequence gets its image's number of placeholders, the batch's
    latents are a list in reading order (padded and packed alike), and a model trains on it; a batch of one size is
    one tensor, as before."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from diffusers import FlowMatchEulerDiscreteScheduler

    from pipeline_components import get_tokenizer
    from transfusion_hf.data.collator import TransfusionDataCollator
    from transfusion_hf.noising import TransfusionNoiser
    from transfusion_hf.processing_transfusion import TransfusionProcessor, special_token_ids

    tokenizer = get_tokenizer()
    processor = TransfusionProcessor(tokenizer, image_size=8, num_image_tokens=4)
    config = TransfusionConfig(
        text_config={**TEXT, "vocab_size": len(tokenizer)},
        **special_token_ids(tokenizer),
        **{**UNET, "max_latent_size": 16},
    )
    torch.manual_seed(0)
    model = TransfusionForMixedModal(config)
    noiser = TransfusionNoiser(FlowMatchEulerDiscreteScheduler(), prediction_type="flow_prediction")
    generator = torch.Generator().manual_seed(0)
    sizes = [(8, 8), (8, 16), (16, 8), (8, 16)]
    examples = [
        {"text": f"caption {index}", "latents": torch.randn(3, *size, generator=generator)}
        for index, size in enumerate(sizes)
    ]
    for packed in (None, 256):
        collator = TransfusionDataCollator(processor, noiser, seed=1, patch_size=4, max_sequence_length=packed)
        batch = collator(examples)
        assert isinstance(batch["latents"], list) and len(batch["latents"]) == 4
        grids = [tuple(latents.shape[-2:]) for latents in batch["latents"]]
        assert placeholder_block_lengths(batch["input_ids"], config.image_token_id) == [
            (h // 4) * (w // 4) for h, w in grids
        ]
        assert [tuple(t.shape) for t in batch["diffusion_targets"]] == [(3, *grid) for grid in grids]
        loss = model(**batch).loss
        assert torch.isfinite(loss)
        loss.backward()
    same = TransfusionDataCollator(processor, noiser, seed=1, patch_size=4)(
        [{"text": "a", "latents": torch.zeros(3, 8, 16)}, {"text": "b", "latents": torch.zeros(3, 8, 16)}]
    )
    assert isinstance(same["latents"], torch.Tensor) and same["latents"].shape == (2, 3, 8, 16)


def test_a_clean_context_image_takes_no_diffusion_loss():
    """`diffusion_targets` as a list with None for a clean context image (the source of an edit): the loss is the
    mean over the other images, and equals the loss of the targeted images alone."""
    from transfusion_hf.loss_transfusion import diffusion_loss

    predictions = torch.randn(3, 3, 8, 8)
    targets = [None, torch.zeros(3, 8, 8), torch.ones(3, 8, 8)]
    expected = diffusion_loss(predictions[1:], torch.stack(targets[1:]))
    torch.testing.assert_close(diffusion_loss(predictions, targets), expected)
    weights = torch.tensor([5.0, 1.0, 2.0])
    torch.testing.assert_close(
        diffusion_loss(predictions, targets, weights),
        diffusion_loss(predictions[1:], torch.stack(targets[1:]), weights[1:]),
    )
    assert diffusion_loss(predictions, [None, None, None]) == 0
    with pytest.raises(ValueError, match=r"`diffusion_targets` has 1 entries but there are 3 images"):
        diffusion_loss(predictions, [None])


def test_placeholder_blocks_must_match_one_tensor_of_another_grid():
    """Two 8x12 images (6 patches each) against 12 placeholders in blocks of 4, 4 and 4: the total fits, the blocks
    do not; refused instead of splitting an image's patches over two blocks."""
    model = perturbed_model()
    config = model.config
    ids = torch.tensor([image_row(config, [5], [(8, 8), (8, 8), (8, 8)])])
    with pytest.raises(ValueError, match=r"blocks of `input_ids` have \[4, 4, 4\] positions but the images of "
                       r"`latents` have \[6, 6\] patches"):  # fmt: skip
        model(input_ids=ids, latents=torch.zeros(2, 3, 8, 12), timesteps=torch.zeros(2))


def test_generate_expands_images_of_several_sizes():
    """`generate(num_return_sequences=2)` repeats each row's own images, for a list of latents too."""
    model = perturbed_model()
    config = model.config
    ids = torch.tensor([image_row(config, [5], [(8, 8), (8, 12)])])
    latents = [torch.randn(3, 8, 8), torch.randn(3, 8, 12)]
    out = model.generate(
        input_ids=ids, latents=latents, timesteps=torch.zeros(2), max_new_tokens=2, do_sample=False,
        num_return_sequences=2, num_beams=2, pad_token_id=0,
    )  # fmt: skip
    assert out.shape[0] == 2
