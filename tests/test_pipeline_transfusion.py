"""TransfusionPipeline: text-to-image with the prefix KV cache and batched CFG, captioning, interleaved generation."""

from __future__ import annotations

import json
import logging
import os
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from transformers import LogitsProcessorList

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pipeline_components import (  # noqa: E402
    MAX_POSITIONS,
    NUM_PATCHES,
    ForceTokens,
    get_dummy_components,
    get_generator,
    get_scheduler,
    get_tokenizer,
    get_transformer,
    make_pipe,
    one_thread,  # noqa: F401 (autouse fixture)
)
from transfusion_hf.pipeline_transfusion import TransfusionPipeline, TransfusionPipelineOutput  # noqa: E402
from transfusion_hf.processing_transfusion import pad_sequences  # noqa: E402

STEPS = 2
PROMPTS = ["a small red circle in the top left", "a blue square"]
IMAGE_SIZE = 8  # latent 4x4, VAE scale factor 2


@pytest.fixture(scope="module")
def components():
    return get_dummy_components()


@pytest.fixture
def pipe(components):
    return make_pipe(components)


def run(pipe, prompt=PROMPTS, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("output_type", "latent")
    return pipe(prompt, generator=get_generator(seed), **kwargs).images


def force(*tokens):
    return LogitsProcessorList([ForceTokens(tokens)])


def word_id(pipe) -> int:
    """A caption word that is one token (with its leading space), so forcing it n times decodes to n words."""
    tokenizer = pipe.processor.tokenizer
    for word in ("circle", "square", "the", "a"):
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) == 1:
            return ids[0]
    raise AssertionError("no single-token word in the tiny tokenizer")


def words(pipe, count) -> str:
    return " ".join([pipe.processor.decode([word_id(pipe)])] * count)


# --------------------------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_output_types_and_shapes(pipe, output_type):
    output = pipe(PROMPTS, num_inference_steps=STEPS, generator=get_generator(), output_type=output_type)
    assert isinstance(output, TransfusionPipelineOutput)
    images = output.images
    if output_type == "pil":
        assert isinstance(images, list) and len(images) == 2
        assert all(isinstance(image, PIL.Image.Image) and image.size == (IMAGE_SIZE, IMAGE_SIZE) for image in images)
        assert all(image.mode == "RGB" for image in images)
    elif output_type == "np":
        assert isinstance(images, np.ndarray) and images.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
        assert images.min() >= 0 and images.max() <= 1
    elif output_type == "pt":
        assert isinstance(images, torch.Tensor) and images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
        assert images.min() >= 0 and images.max() <= 1
    else:
        assert isinstance(images, torch.Tensor) and images.shape == (2, 4, 4, 4)
        assert torch.isfinite(images).all()


def test_output_types_agree(pipe):
    np_images = run(pipe, output_type="np")
    pt_images = run(pipe, output_type="pt")
    np.testing.assert_allclose(np_images, pt_images.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    pil_images = run(pipe, output_type="pil")
    np.testing.assert_allclose(np.asarray(pil_images[0]) / 255.0, np_images[0], atol=1 / 255 + 1e-6)
    latents = run(pipe, output_type="latent")
    np.testing.assert_allclose(pipe.decode_latents(latents, "np"), np_images, atol=1e-6)


def test_return_dict_false_gives_a_tuple(pipe):
    output = pipe(PROMPTS, num_inference_steps=STEPS, generator=get_generator(), output_type="np", return_dict=False)
    assert isinstance(output, tuple) and len(output) == 1
    np.testing.assert_array_equal(output[0], run(pipe, output_type="np"))


def test_seeded_determinism_and_informative_outputs(pipe):
    first = run(pipe)
    assert torch.equal(first, run(pipe))
    assert (first - run(pipe, seed=1)).abs().max() > 1e-3
    # The prompt matters (the weights are perturbed, so the text path reaches the image).
    assert (first - run(pipe, prompt=["a green triangle", "two yellow dots"])).abs().max() > 1e-4
    assert (run(pipe, guidance_scale=1.0) - run(pipe, guidance_scale=5.0)).abs().max() > 1e-4


def test_given_latents_equal_drawn_noise(components):
    # Euler scales its starting noise by init_noise_sigma: given latents and drawn noise are treated alike.
    pipe = make_pipe(components, scheduler=EulerDiscreteScheduler())
    noise = torch.randn((2, 4, 4, 4), generator=get_generator(3))
    torch.testing.assert_close(run(pipe, seed=3), run(pipe, latents=noise), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="latents"):
        run(pipe, latents=torch.randn(1, 4, 4, 4))


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_kv_cache_matches_uncached(pipe, guidance_scale):
    kwargs = {"guidance_scale": guidance_scale, "negative_prompt": ["blurry", ""]}
    cached = run(pipe, use_kv_cache=True, **kwargs)
    uncached = run(pipe, use_kv_cache=False, **kwargs)
    torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=0)


def test_initial_noise_is_scaled_after_set_timesteps(components):
    # With timestep_spacing="leading" the inference sigmas differ from the training ones: the model input of the
    # first step must have unit variance (x * sigma_max / sqrt(sigma_max^2 + 1)).
    pipe = make_pipe(components, scheduler=EulerDiscreteScheduler(timestep_spacing="leading"))
    seen = []
    predict = pipe._predict

    def spy(latents, *args):
        seen.append(latents.std().item())
        return predict(latents, *args)

    pipe._predict = spy
    run(pipe, num_inference_steps=3, num_images_per_prompt=4)
    assert 0.7 < seen[0] < 1.3


# ------------------------------------------------------------------------------------------- schedulers
SCHEDULERS = {
    "ddpm": ("epsilon", lambda: DDPMScheduler(clip_sample=False)),
    "ddim": ("epsilon", lambda: DDIMScheduler(clip_sample=False)),
    "dpm": ("epsilon", lambda: DPMSolverMultistepScheduler()),
    "euler": ("epsilon", lambda: EulerDiscreteScheduler()),
    "flow": ("flow_prediction", lambda: FlowMatchEulerDiscreteScheduler()),
    "dpm-flow": (
        "flow_prediction",
        lambda: DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True),
    ),
    "ddpm-v": ("v_prediction", lambda: DDPMScheduler(prediction_type="v_prediction", clip_sample=False)),
    "ddim-v": ("v_prediction", lambda: DDIMScheduler(prediction_type="v_prediction", clip_sample=False)),
}


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer()


@pytest.fixture(scope="module")
def models(tokenizer):
    return {kind: get_transformer(tokenizer, kind) for kind in ("epsilon", "v_prediction", "flow_prediction")}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_each_scheduler_runs(components, models, name):
    prediction_type, make_scheduler = SCHEDULERS[name]
    pipe = make_pipe(components, transformer=models[prediction_type], scheduler=make_scheduler())
    images = run(pipe, num_inference_steps=3, output_type="np")
    assert images.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3) and np.isfinite(images).all()
    latents = run(pipe, num_inference_steps=3)
    assert torch.isfinite(latents).all() and latents.abs().max() < 1e3
    torch.testing.assert_close(latents, run(pipe, num_inference_steps=3, use_kv_cache=False), atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_inference_steps", [10, 250, 1000])
def test_epsilon_sampler_of_the_cosine_schedule_at_any_step_count(components, models, caplog, num_inference_steps):
    """The epsilon sampler the training script saves (DPM-Solver++ cut at `EPSILON_LAMBDA_MIN`) starts at t = 995 at
    every step count and, with an exact predictor, lands on the clean image; 1000 steps (more than the 995 distinct
    timesteps above zero SNR) sample each timestep once, with a warning, instead of dividing by a zero step (NaN)."""
    training = DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False)
    fields = TransfusionPipeline.epsilon_start_below_zero_snr("DPMSolverMultistepScheduler")
    scheduler = TransfusionPipeline.scheduler_from_config("DPMSolverMultistepScheduler", training.config, "epsilon")
    scheduler = DPMSolverMultistepScheduler.from_config(scheduler.config, **fields)
    pipe = make_pipe(components, transformer=models["epsilon"], scheduler=scheduler)
    clean = torch.linspace(-0.9, 0.9, 4 * 4 * 4).reshape(1, 4, 4, 4)
    alphas_cumprod = training.alphas_cumprod
    seen = []

    def exact_epsilon(latents, timestep, *args):
        seen.append(int(timestep))
        alpha_bar = alphas_cumprod[int(timestep)]
        return (latents - alpha_bar.sqrt() * clean) / (1 - alpha_bar).sqrt()

    pipe._predict = exact_epsilon
    with caplog.at_level("WARNING"):
        latents = run(pipe, prompt=PROMPTS[:1], num_inference_steps=num_inference_steps, guidance_scale=1.0)
    assert seen[0] == 995 and len(seen) == len(set(seen)) == min(num_inference_steps, 995)
    assert ("distinct timesteps" in caplog.text) is (num_inference_steps > 995)
    torch.testing.assert_close(latents, clean, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------- CFG
def prefix(pipe, text):
    return pipe.processor.encode_parts([text]) + [pipe.processor.boi_token_id]


@pytest.mark.parametrize("use_kv_cache", [True, False])
def test_batched_cfg_prediction_equals_separate_passes(pipe, use_kv_cache):
    prefixes = [prefix(pipe, PROMPTS[0]), prefix(pipe, "")]
    pad = pipe.processor.tokenizer.pad_token_id
    latents = torch.randn((1, 4, 4, 4), generator=get_generator(5))
    timestep = torch.tensor(700)

    def predict(rows, x):
        if use_kv_cache:
            cache, ids, mask = pipe._prefill(rows)
            return pipe._predict(x, timestep, ids, mask, cache)
        ids, mask = pad_sequences(rows, pad, "left")
        return pipe._predict(x, timestep, ids, mask, None)

    with torch.no_grad():
        batched = predict(prefixes, torch.cat([latents, latents]))
        conditional = predict(prefixes[:1], latents)
        unconditional = predict(prefixes[1:], latents)
    torch.testing.assert_close(batched[:1], conditional, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched[1:], unconditional, atol=1e-5, rtol=0)
    assert (conditional - unconditional).abs().max() > 1e-4


def test_guided_latents_equal_manual_guidance(components):
    guidance = 4.0
    pipe = make_pipe(components, scheduler=DDIMScheduler(clip_sample=False))
    start = torch.randn((1, 4, 4, 4), generator=get_generator(2))
    result = pipe(PROMPTS[0], latents=start, guidance_scale=guidance, num_inference_steps=3, output_type="latent")

    scheduler = DDIMScheduler(clip_sample=False)
    scheduler.set_timesteps(3)
    pad = pipe.processor.tokenizer.pad_token_id
    rows = [pad_sequences([prefix(pipe, text)], pad, "left") for text in (PROMPTS[0], "")]
    x = start.clone()
    with torch.no_grad():
        for timestep in scheduler.timesteps:
            conditional, unconditional = (pipe._predict(x, timestep, ids, mask, None) for ids, mask in rows)
            x = scheduler.step(unconditional + guidance * (conditional - unconditional), timestep, x).prev_sample
    # DDIM's x0 estimate divides by sqrt(alpha_cumprod) (tiny at t=999): float noise of left padding grows to ~1e-5.
    torch.testing.assert_close(result.images, x, atol=1e-4, rtol=1e-4)


def count_forward_batches(pipe):
    batches = []
    pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: batches.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    return batches


def test_prompt_list_is_one_batch(tokenizer, components):
    # A private model: the forward hook must not leak into the other tests.
    pipe = make_pipe(components, transformer=get_transformer(tokenizer))
    batches = count_forward_batches(pipe)
    images = run(pipe, num_images_per_prompt=3, guidance_scale=3.0)
    assert images.shape == (6, 4, 4, 4)
    # One prefill and one call per step, each over all (conditional + unconditional) rows.
    assert batches == [12] * (1 + STEPS)
    batches.clear()
    run(pipe, guidance_scale=1.0, use_kv_cache=False)
    assert batches == [2] * STEPS


def test_batched_rows_equal_single_prompts(components):
    pipe = make_pipe(components, scheduler=DDIMScheduler(clip_sample=False))  # deterministic steps
    noise = torch.randn((4, 4, 4, 4), generator=get_generator(7))
    noise[1] = noise[0]  # both images of the first prompt start from the same noise
    batch = run(pipe, latents=noise, num_images_per_prompt=2, guidance_scale=3.0)
    torch.testing.assert_close(batch[0], batch[1], atol=1e-6, rtol=0)
    assert (batch[2] - batch[3]).abs().max() > 1e-3
    for row, text in ((0, PROMPTS[0]), (2, PROMPTS[1]), (3, PROMPTS[1])):
        single = run(pipe, prompt=text, latents=noise[row : row + 1], guidance_scale=3.0)
        torch.testing.assert_close(batch[row : row + 1], single, atol=1e-5, rtol=0)


def test_pixel_space_pipeline_without_vae():
    components = get_dummy_components(pixel_space=True)
    pipe = make_pipe(components)
    assert pipe.vae is None and pipe.image_size == 4
    images = run(pipe, output_type="np")
    assert images.shape == (2, 4, 4, 3) and np.isfinite(images).all()
    assert run(pipe).shape == (2, 3, 4, 4)
    # Clipping x0 is right for pixels: a clip_sample=True scheduler is kept as is.
    pipe = make_pipe(components, scheduler=DDPMScheduler())
    assert pipe.scheduler.config.clip_sample is True
    assert run(pipe, output_type="pt").shape == (2, 3, 4, 4)
    # Captioning pixels works the same way.
    captions = pipe.caption([np.zeros((4, 4, 3), np.uint8)] * 2, max_new_tokens=3)
    assert len(captions) == 2 and all(isinstance(text, str) for text in captions)


# -------------------------------------------------------------------------------------------- caption
def capture_generate(pipe):
    outputs = []
    generate = pipe.transformer.generate

    def spy(*args, **kwargs):
        output = generate(*args, **kwargs)
        outputs.append((kwargs["input_ids"].shape[1], output))
        return output

    pipe.transformer.generate = spy
    return outputs


def test_caption_returns_one_string_per_image(pipe):
    images = [PIL.Image.new("RGB", (8, 8), (255, 0, 0)), np.zeros((16, 12, 3), np.uint8), torch.rand(3, 8, 8)]
    outputs = capture_generate(pipe)
    captions = pipe.caption(images, max_new_tokens=4)
    assert isinstance(captions, list) and len(captions) == 3 and all(isinstance(text, str) for text in captions)
    prompt_length, sequences = outputs[0]
    assert sequences.shape[0] == 3 and 1 <= sequences.shape[1] - prompt_length <= 4
    # A single image gives a one-element list.
    assert len(pipe.caption(images[0], max_new_tokens=2)) == 1
    # With a prompt after the image.
    assert len(pipe.caption(images[:2], prompt="describe:", max_new_tokens=2)) == 2


def test_caption_of_the_pipelines_own_batched_outputs(pipe):
    for output_type in ("pt", "np"):
        images = run(pipe, output_type=output_type)
        captions = pipe.caption(images, max_new_tokens=2)
        assert len(captions) == 2 and all(isinstance(text, str) for text in captions)


def test_caption_respects_max_new_tokens(pipe):
    red = word_id(pipe)
    captions = pipe.caption([PIL.Image.new("RGB", (8, 8))] * 2, max_new_tokens=5, logits_processor=force(*[red] * 10))
    assert captions == [words(pipe, 5)] * 2
    outputs = capture_generate(pipe)
    pipe.caption(PIL.Image.new("RGB", (8, 8)), max_new_tokens=3)
    prompt_length, sequences = outputs[0]
    assert sequences.shape[1] - prompt_length <= 3


def test_caption_depends_on_the_image(pipe):
    # Greedy next-token logits after the image differ between two images: the clean image reaches the text.
    first = pipe.encode_images(PIL.Image.new("RGB", (8, 8), (255, 0, 0)))
    second = pipe.encode_images(PIL.Image.new("RGB", (8, 8), (0, 0, 255)))
    ids = torch.tensor([pipe.processor.encode_parts([None])])
    with torch.no_grad():
        logits = [
            pipe.transformer(input_ids=ids, latents=latents, timesteps=torch.zeros(1)).logits[0, -1]
            for latents in (first, second)
        ]
    assert (logits[0] - logits[1]).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------- generate
def test_generate_text_stops_at_max_new_tokens(pipe):
    red = word_id(pipe)
    outputs = pipe.generate("a small", max_new_tokens=4, logits_processor=force(*[red] * 10))
    assert outputs == [words(pipe, 4)]
    # Free greedy text: a list of strings, never more than max_new_tokens tokens.
    seen = []
    next_token = pipe._next_token

    def spy(*args):
        token = next_token(*args)
        seen.append(token)
        return token

    pipe._next_token = spy
    outputs = pipe.generate("a small", max_new_tokens=6, guidance_scale=1.0, num_inference_steps=STEPS)
    assert len(seen) <= 6 and all(isinstance(item, (str, PIL.Image.Image)) for item in outputs)
    assert pipe.processor.image_token_id not in seen


def test_generate_stops_at_eos(pipe):
    eos = pipe.processor.tokenizer.eos_token_id
    assert pipe.generate("a small", max_new_tokens=10, logits_processor=force(word_id(pipe), eos)) == [words(pipe, 1)]


def test_generate_switches_to_an_image_on_boi(pipe):
    boi, eos, red = pipe.processor.boi_token_id, pipe.processor.tokenizer.eos_token_id, word_id(pipe)
    outputs = pipe.generate(
        "a blue square",
        max_new_tokens=10,
        num_inference_steps=STEPS,
        logits_processor=force(red, boi, red, red, eos),
        generator=get_generator(0),
    )
    assert len(outputs) == 3
    assert outputs[0] == words(pipe, 1) and outputs[2] == words(pipe, 2)
    assert isinstance(outputs[1], PIL.Image.Image) and outputs[1].size == (IMAGE_SIZE, IMAGE_SIZE)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_generated_image_equals_text_to_image(pipe, guidance_scale):
    # <boi> right after the prompt: the same prefixes, noise and sampler as __call__.
    boi, eos = pipe.processor.boi_token_id, pipe.processor.tokenizer.eos_token_id
    outputs = pipe.generate(
        PROMPTS[0],
        max_new_tokens=3,
        num_inference_steps=STEPS,
        guidance_scale=guidance_scale,
        logits_processor=force(boi, eos),
        generator=get_generator(4),
    )
    assert len(outputs) == 1 and isinstance(outputs[0], PIL.Image.Image)
    expected = run(pipe, prompt=PROMPTS[0], seed=4, guidance_scale=guidance_scale, output_type="pil")[0]
    np.testing.assert_array_equal(np.asarray(outputs[0]), np.asarray(expected))


def test_generate_two_images_and_max_images(pipe):
    boi = pipe.processor.boi_token_id
    outputs = pipe.generate(
        "a red circle",
        max_new_tokens=5,
        num_inference_steps=STEPS,
        logits_processor=force(boi, boi, boi),
        max_images=2,
    )
    assert [type(item) for item in outputs] == [PIL.Image.Image, PIL.Image.Image]


def test_text_after_a_generated_image_sees_it(pipe):
    """The next-token logits after `<eoi>` (KV cache path) equal a full forward over the whole interleaved sequence."""
    boi, red = pipe.processor.boi_token_id, word_id(pipe)
    latents_seen, logits_seen = [], []
    denoise, next_token = pipe._denoise, pipe._next_token

    def spy_denoise(*args, **kwargs):
        latents = denoise(*args, **kwargs)
        latents_seen.append(latents)
        return latents

    def spy_next(logits, *args):
        logits_seen.append(logits.clone())
        return next_token(logits, *args)

    pipe._denoise, pipe._next_token = spy_denoise, spy_next
    pipe.generate("a red", max_new_tokens=2, num_inference_steps=STEPS, logits_processor=force(boi, red))
    ids = pipe.processor.encode_parts(["a red", None])
    with torch.no_grad():
        full = pipe.transformer(
            input_ids=torch.tensor([ids]), latents=latents_seen[0], timesteps=torch.zeros(1)
        ).logits[0, -1]
    expected = full.clone()
    expected[pipe.processor.image_token_id] = float("-inf")
    torch.testing.assert_close(logits_seen[1][0], expected, atol=1e-4, rtol=0)


def test_image_placeholder_is_never_sampled_as_text(tokenizer, components):
    # A model that loves the bare <image> placeholder: as text it would reach the model without latents and raise.
    transformer = get_transformer(tokenizer)
    image_token_id = transformer.config.image_token_id

    def boost(module, args, output):
        output = output.clone()
        output[..., image_token_id] += 1e4
        return output

    transformer.lm_head.register_forward_hook(boost)
    pipe = make_pipe(components, transformer=transformer)
    captions = pipe.caption([PIL.Image.new("RGB", (8, 8))] * 2, max_new_tokens=3)
    assert len(captions) == 2
    outputs = pipe.generate("a red", max_new_tokens=3, num_inference_steps=1, guidance_scale=1.0)
    assert all(isinstance(item, (str, PIL.Image.Image)) for item in outputs)
    sampled = pipe.generate(
        "a red", max_new_tokens=3, do_sample=True, num_inference_steps=1, generator=get_generator()
    )
    assert all(isinstance(item, (str, PIL.Image.Image)) for item in sampled)


def test_generate_with_an_image_in_the_context(pipe):
    """Editing: a given image enters as clean context and conditions the generated image."""
    boi, eos = pipe.processor.boi_token_id, pipe.processor.tokenizer.eos_token_id
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255

    def edit(image, guidance_scale=3.0):
        return pipe.generate(
            ["make it blue:", image, "now"],
            max_new_tokens=3,
            num_inference_steps=STEPS,
            guidance_scale=guidance_scale,
            logits_processor=force(boi, eos),
            generator=get_generator(0),
        )

    outputs = edit(PIL.Image.fromarray(red))
    assert len(outputs) == 1 and isinstance(outputs[0], PIL.Image.Image)
    again = edit(PIL.Image.fromarray(red))
    np.testing.assert_array_equal(np.asarray(outputs[0]), np.asarray(again[0]))
    other = edit(PIL.Image.fromarray(255 - red))
    assert np.abs(np.asarray(outputs[0], np.int16) - np.asarray(other[0], np.int16)).max() > 0
    assert isinstance(edit(torch.rand(3, 8, 8), guidance_scale=1.0)[0], PIL.Image.Image)


def test_generate_sampling_is_seeded(pipe):
    kwargs = {"max_new_tokens": 6, "do_sample": True, "temperature": 1.5, "top_k": 20, "num_inference_steps": STEPS}
    first = pipe.generate("a red", generator=get_generator(9), **kwargs)
    second = pipe.generate("a red", generator=get_generator(9), **kwargs)
    assert [item if isinstance(item, str) else np.asarray(item).tolist() for item in first] == [
        item if isinstance(item, str) else np.asarray(item).tolist() for item in second
    ]


# ------------------------------------------------------------------------------------------ save / load
def test_save_and_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    assert {"model_index.json", "transformer", "vae", "scheduler", "tokenizer"} <= set(os.listdir(tmp_path))
    index = json.loads((tmp_path / "model_index.json").read_text())
    # The code saved beside the weights (tests/test_remote_code.py); this class still loads itself.
    assert index["transformer"] == ["modeling_transfusion", "TransfusionForMixedModal"]
    loaded = TransfusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is type(pipe.scheduler)
    np.testing.assert_array_equal(run(loaded, output_type="np"), run(pipe, output_type="np"))
    assert loaded.caption(PIL.Image.new("RGB", (8, 8)), max_new_tokens=3) == pipe.caption(
        PIL.Image.new("RGB", (8, 8)), max_new_tokens=3
    )


# --------------------------------------------------------------------------------------- progress bar
def test_progress_bar_can_be_disabled(components, capsys):
    pipe = TransfusionPipeline(**dict(components, scheduler=get_scheduler()))
    run(pipe)
    assert "2/2" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    run(pipe)
    assert "2/2" not in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- errors
def test_prompt_longer_than_the_context_raises(pipe):
    long_prompt = "red " * MAX_POSITIONS
    with pytest.raises(ValueError, match="max_position_embeddings=128"):
        run(pipe, prompt=long_prompt)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        pipe.generate(long_prompt, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        pipe.caption(PIL.Image.new("RGB", (8, 8)), max_new_tokens=MAX_POSITIONS)
    # Just below the limit still works: prompt + <boi> + N image positions + <eoi> fit.
    fitting = run(pipe, prompt="", num_inference_steps=1)
    assert fitting.shape[0] == 1


@pytest.mark.parametrize(("name", "value"), [("height", 16), ("width", 6), ("height", 9)])
def test_size_not_fitting_the_latent_grid_raises(pipe, name, value):
    # Sides are multiples of the patch (2 latents = 4 pixels through the VAE's 2x) up to max_latent_size (4 = 8 px).
    with pytest.raises(ValueError, match=f"`{name}`={value} does not fit the latent grid: this model makes images "
                       "whose sides are multiples of 4 pixels"):  # fmt: skip
        run(pipe, **{name: value})
    assert run(pipe, height=IMAGE_SIZE, width=IMAGE_SIZE).shape == (2, 4, 4, 4)
    assert run(pipe, width=4).shape == (2, 4, 4, 2)  # a smaller, non-square image: the grid's top-left positions


def test_invalid_call_arguments_raise(pipe):
    with pytest.raises(ValueError, match="guidance_scale"):
        run(pipe, guidance_scale=-1.0)
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe.generate("x", guidance_scale=-0.5)
    with pytest.raises(ValueError, match="num_inference_steps"):
        run(pipe, num_inference_steps=0)
    with pytest.raises(ValueError, match="negative_prompt"):
        run(pipe, negative_prompt=["a", "b", "c"])


@pytest.mark.parametrize(
    ("prediction_type", "scheduler"),
    [
        ("epsilon", DDPMScheduler(prediction_type="v_prediction", clip_sample=False)),
        ("epsilon", FlowMatchEulerDiscreteScheduler()),
        ("v_prediction", EulerDiscreteScheduler()),
        ("flow_prediction", DDIMScheduler(clip_sample=False)),
    ],
)
def test_scheduler_prediction_type_mismatch_raises(components, models, prediction_type, scheduler):
    with pytest.raises(ValueError, match="prediction_type"):
        make_pipe(components, transformer=models[prediction_type], scheduler=scheduler)


@pytest.mark.parametrize("scheduler_class", [DDPMScheduler, DDIMScheduler])
def test_clip_sample_on_latents_is_fixed_with_a_warning(components, caplog, scheduler_class):
    with caplog.at_level(logging.WARNING):
        pipe = make_pipe(components, scheduler=scheduler_class())
    assert "clip_sample=True" in caplog.text
    assert pipe.scheduler.config.clip_sample is False and isinstance(pipe.scheduler, scheduler_class)
    # A scheduler swapped in later is checked at call time too.
    pipe.scheduler = scheduler_class(clip_sample=True)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run(pipe)
    assert "clip_sample=True" in caplog.text
    assert pipe.scheduler.config.clip_sample is False


def test_thresholding_on_latents_is_fixed_with_a_warning(components, caplog):
    """diffusers' thresholding clamps x0 like clip_sample (to [-1, 1] with sample_max_value=1): wrong for latents."""
    scheduler = DPMSolverMultistepScheduler(thresholding=True, algorithm_type="sde-dpmsolver++")
    with caplog.at_level(logging.WARNING):
        pipe = make_pipe(components, scheduler=scheduler)
    assert "thresholding=True" in caplog.text and "latents" in caplog.text
    assert pipe.scheduler.config.thresholding is False
    assert pipe.scheduler.config.algorithm_type == "sde-dpmsolver++"  # the rest of the config is kept


@pytest.mark.parametrize(
    ("scheduler_class", "expected"),
    [
        (DDPMScheduler, {"clip_sample": True, "clip_sample_range": 1.0}),
        ("DDIMScheduler", {"clip_sample": True, "clip_sample_range": 1.0}),
        (DPMSolverMultistepScheduler, {"thresholding": True, "sample_max_value": 1.0}),
        ("UniPCMultistepScheduler", {"thresholding": True, "sample_max_value": 1.0}),
        (EulerDiscreteScheduler, {}),
        (FlowMatchEulerDiscreteScheduler, {}),
    ],
)
def test_pixel_range_clamp_fields(scheduler_class, expected):
    assert TransfusionPipeline.pixel_range_clamp(scheduler_class) == expected
    with pytest.raises(ValueError, match="NoSuchScheduler"):
        TransfusionPipeline.pixel_range_clamp("NoSuchScheduler")


def test_pixel_range_clamp_keeps_samples_in_range_and_survives_a_pixel_pipeline():
    """With the clamp, the DPM-Solver++ SDE samples of a pixel-space model stay in [-1, 1] even when the model's
    implied x0 is far outside it, and the pipeline keeps the clamp (no VAE); without it they leave the range."""
    pixel = get_dummy_components(pixel_space=True)
    with torch.no_grad():
        for parameter in pixel["transformer"].parameters():
            parameter.mul_(40.0)  # a wildly wrong noise prediction: x0 = (x_t - sigma * eps) / alpha is huge
    config = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++").config
    clamp = TransfusionPipeline.pixel_range_clamp(DPMSolverMultistepScheduler)
    pipe = make_pipe(
        pixel,
        scheduler=TransfusionPipeline.scheduler_from_config("DPMSolverMultistepScheduler", config, "epsilon", **clamp),
    )
    assert pipe.scheduler.config.thresholding is True
    clamped = run(pipe, num_inference_steps=6)
    pipe.scheduler = TransfusionPipeline.scheduler_from_config("DPMSolverMultistepScheduler", config, "epsilon")
    unclamped = run(pipe, num_inference_steps=6)
    assert torch.isfinite(clamped).all() and clamped.abs().max() <= 1.0 + 1e-5
    assert unclamped.abs().max() > 2.0


def test_flow_multistep_solver_gets_flow_sigmas(components, models, caplog):
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction")
    with caplog.at_level(logging.WARNING):
        pipe = make_pipe(components, transformer=models["flow_prediction"], scheduler=scheduler)
    assert "use_flow_sigmas" in caplog.text
    assert pipe.scheduler.config.use_flow_sigmas is True
    # The model is conditioned on t = sigma * 1000 along x_t = (1 - sigma) x0 + sigma noise; so are the steps.
    pipe.scheduler.set_timesteps(4)
    sigmas = pipe.scheduler.sigmas[:-1]
    torch.testing.assert_close(pipe.scheduler.timesteps.float() / 1000, sigmas.float(), atol=1e-3, rtol=0)


def test_text_entry_points_need_a_tokenizer(components):
    pipe = make_pipe(components, tokenizer=None)
    with pytest.raises(ValueError, match="tokenizer"):
        pipe.caption(PIL.Image.new("RGB", (8, 8)))
    with pytest.raises(ValueError, match="tokenizer"):
        pipe("a red circle", num_inference_steps=1)
    with pytest.raises(ValueError, match="tokenizer"):
        pipe.generate("a red circle")
    # Images still decode without a tokenizer.
    assert pipe.decode_latents(torch.zeros(1, 4, 4, 4), "np").shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)


def test_inconsistent_components_raise(components, tokenizer):
    # A tokenizer whose special ids differ from the model's.
    other = get_tokenizer(vocab_size=300)
    other.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    shifted = get_transformer(tokenizer)
    shifted.config.boi_token_id, shifted.config.eoi_token_id = shifted.config.eoi_token_id, shifted.config.boi_token_id
    with pytest.raises(ValueError, match="boi_token_id"):
        make_pipe(components, transformer=shifted)
    # Pixel space needs 3 channels.
    with pytest.raises(ValueError, match="latent_channels=3"):
        make_pipe(components, vae=None)


def test_num_patches_matches_processor(pipe):
    assert pipe.processor.num_image_tokens == NUM_PATCHES == pipe.transformer.config.num_patches
    assert pipe.processor.image_size == IMAGE_SIZE
