"""TransfusionPipeline follows diffusers' pipeline conventions: `callback_on_step_end`, custom `timesteps` / `sigmas`
through `retrieve_timesteps`, `_compatibles` schedulers, the progress bar config, `_execution_device` and model CPU
offload."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
)
from diffusers.callbacks import PipelineCallback, SDCFGCutoffCallback
from transformers import LogitsProcessorList

from pipeline_components import (
    ForceTokens,
    get_dummy_components,
    get_generator,
    get_scheduler,
    get_tokenizer,
    get_transformer,
    make_pipe,
    one_thread,  # noqa: F401 (autouse fixture)
)
from transfusion_hf.pipeline_transfusion import TransfusionPipeline

STEPS = 3
PROMPTS = ["a small red circle in the top left", "a blue square"]


@pytest.fixture(scope="module")
def components():
    return get_dummy_components()


@pytest.fixture(scope="module")
def models():
    tokenizer = get_tokenizer()
    return {kind: get_transformer(tokenizer, kind) for kind in ("epsilon", "v_prediction", "flow_prediction")}


@pytest.fixture
def pipe(components):
    return make_pipe(components)


def run(pipe, prompt=PROMPTS, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("output_type", "latent")
    return pipe(prompt, generator=get_generator(seed), **kwargs).images


class Recorder:
    """A `callback_on_step_end` that records what it is given and can hand back new latents at chosen steps."""

    def __init__(self, replace: dict[int, torch.Tensor] | None = None):
        self.calls: list[tuple[int, float, dict[str, torch.Tensor]]] = []
        self.replace = replace or {}

    def __call__(self, pipeline, step_index, timestep, callback_kwargs):
        assert isinstance(pipeline, TransfusionPipeline)
        self.calls.append((step_index, float(timestep), {k: v.clone() for k, v in callback_kwargs.items()}))
        if step_index in self.replace:
            return {"latents": self.replace[step_index]}
        return {}


def one_image(pipe, **kwargs):
    """`generate` forced to make exactly one image right after the prompt, then stop."""
    boi, eos = pipe.processor.boi_token_id, pipe.processor.tokenizer.eos_token_id
    kwargs.setdefault("num_inference_steps", STEPS)
    return pipe.generate(
        PROMPTS[0],
        max_new_tokens=3,
        logits_processor=LogitsProcessorList([ForceTokens([boi, eos])]),
        generator=get_generator(4),
        **kwargs,
    )


# ------------------------------------------------------------------------------------------- callbacks
def test_callback_is_called_once_per_step_with_the_declared_tensors(pipe):
    recorder = Recorder()
    latents = run(
        pipe,
        guidance_scale=3.0,
        callback_on_step_end=recorder,
        callback_on_step_end_tensor_inputs=["latents", "noise_pred"],
    )
    assert [index for index, _, _ in recorder.calls] == list(range(STEPS)) and pipe.num_timesteps == STEPS
    assert [timestep for _, timestep, _ in recorder.calls] == pipe.scheduler.timesteps.float().tolist()
    for _, _, tensors in recorder.calls:
        assert sorted(tensors) == ["latents", "noise_pred"]
        # The guided prediction: one row per image, not the doubled CFG batch.
        assert tensors["latents"].shape == tensors["noise_pred"].shape == (2, 4, 4, 4)
    # "latents" are those after the step: the last ones are the output.
    torch.testing.assert_close(recorder.calls[-1][2]["latents"], latents, atol=0, rtol=0)
    # Only what was asked for is given (diffusers' default: the latents).
    recorder = Recorder()
    run(pipe, callback_on_step_end=recorder)
    assert all(sorted(tensors) == ["latents"] for _, _, tensors in recorder.calls)


def test_callback_can_replace_the_latents(components, pipe):
    baseline = run(pipe)
    # A callback that returns nothing changes nothing.
    torch.testing.assert_close(run(pipe, callback_on_step_end=Recorder()), baseline, atol=0, rtol=0)
    # New latents at the last step are the output.
    replacement = torch.full((2, 4, 4, 4), 0.25)
    assert torch.equal(run(pipe, callback_on_step_end=Recorder({STEPS - 1: replacement})), replacement)
    # New latents at the first step are where the second step starts from (DDIM: a deterministic step).
    ddim = make_pipe(components, scheduler=DDIMScheduler(clip_sample=False))
    steered = Recorder({0: torch.zeros(2, 4, 4, 4)})
    result = run(ddim, callback_on_step_end=steered, callback_on_step_end_tensor_inputs=["latents", "noise_pred"])
    scheduler = DDIMScheduler(clip_sample=False)
    scheduler.set_timesteps(STEPS)
    _, timestep, tensors = steered.calls[1]
    expected = scheduler.step(tensors["noise_pred"], int(timestep), torch.zeros(2, 4, 4, 4)).prev_sample
    torch.testing.assert_close(tensors["latents"], expected, atol=1e-6, rtol=0)
    assert (result - run(ddim)).abs().max() > 1e-3


def test_callback_sees_and_steers_every_image_of_generate(pipe):
    recorder = Recorder()
    [image] = one_image(pipe, callback_on_step_end=recorder)
    assert [index for index, _, _ in recorder.calls] == list(range(STEPS))
    assert recorder.calls[0][2]["latents"].shape == (1, 4, 4, 4)
    # The generated image is decoded from the latents the callback hands back at the last step.
    replacement = torch.randn((1, 4, 4, 4), generator=get_generator(8))
    [image] = one_image(pipe, callback_on_step_end=Recorder({STEPS - 1: replacement}))
    np.testing.assert_array_equal(np.asarray(image), np.asarray(pipe.decode_latents(replacement, "pil")[0]))


def test_a_diffusers_callback_object_declares_its_own_inputs(pipe):
    class PredictionNorms(PipelineCallback):
        tensor_inputs = ["noise_pred"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            self.seen.append(sorted(callback_kwargs))
            return callback_kwargs

    callback = PredictionNorms()
    callback.seen = []
    run(pipe, callback_on_step_end=callback)
    assert callback.seen == [["noise_pred"]] * STEPS
    # diffusers' Stable Diffusion callbacks ask for tensors this pipeline has not got: refused by name.
    with pytest.raises(ValueError, match="prompt_embeds"):
        run(pipe, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5))


def test_unknown_callback_tensor_input_raises_naming_it(pipe):
    for call in (
        lambda names: run(pipe, callback_on_step_end=Recorder(), callback_on_step_end_tensor_inputs=names),
        lambda names: one_image(pipe, callback_on_step_end=Recorder(), callback_on_step_end_tensor_inputs=names),
    ):
        with pytest.raises(ValueError, match=r"callback_on_step_end_tensor_inputs.*\['prompt_embeds'\].*noise_pred"):
            call(["latents", "prompt_embeds"])


def test_bad_callback_results_raise(pipe):
    with pytest.raises(ValueError, match="must return a dict.*NoneType"):
        run(pipe, callback_on_step_end=lambda *args: None)
    with pytest.raises(ValueError, match=r"latents of shape \(1, 4, 4, 4\), expected \(2, 4, 4, 4\)"):
        run(pipe, callback_on_step_end=lambda *args: {"latents": torch.zeros(1, 4, 4, 4)})


def test_interrupt_from_a_callback_skips_the_remaining_steps(components):
    pipe = make_pipe(components, transformer=get_transformer(get_tokenizer()))  # private: a forward hook is added
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))

    def stop(pipeline, step_index, timestep, callback_kwargs):
        pipeline._interrupt = True
        return {}

    recorder = Recorder()
    first_step = run(pipe, num_inference_steps=4, callback_on_step_end=recorder)
    calls.clear()
    stopped = run(pipe, num_inference_steps=4, callback_on_step_end=stop)
    assert len(calls) == 2  # the prefill and one step
    torch.testing.assert_close(stopped, recorder.calls[0][2]["latents"], atol=0, rtol=0)
    assert (stopped - first_step).abs().max() > 1e-3
    # The next call starts afresh.
    assert pipe.interrupt
    calls.clear()
    run(pipe, num_inference_steps=4)
    assert len(calls) == 5 and not pipe.interrupt


# ------------------------------------------------------------------------------- custom timesteps / sigmas
def seen_timesteps(pipe, **kwargs) -> list[float]:
    recorder = Recorder()
    run(pipe, callback_on_step_end=recorder, **kwargs)
    return [timestep for _, timestep, _ in recorder.calls]


def test_custom_timesteps_set_the_schedule(pipe):
    assert seen_timesteps(pipe) == [666.0, 333.0, 0.0]  # DDPM, "leading" spacing
    assert seen_timesteps(pipe, timesteps=[900, 500, 100, 10]) == [900.0, 500.0, 100.0, 10.0]
    assert pipe.num_timesteps == 4
    assert (run(pipe, timesteps=[900, 500, 100]) - run(pipe)).abs().max() > 1e-3


def test_custom_sigmas_set_the_schedule(components, models):
    flow = make_pipe(components, transformer=models["flow_prediction"])
    # The flow model is conditioned on t = 1000 * sigma.
    assert seen_timesteps(flow, sigmas=[1.0, 0.5, 0.25]) == [1000.0, 500.0, 250.0]
    assert (run(flow, sigmas=[1.0, 0.5, 0.25]) - run(flow)).abs().max() > 1e-3
    euler = make_pipe(components, scheduler=EulerDiscreteScheduler())
    default = seen_timesteps(euler)
    # Euler's custom sigmas end with the final one: three steps.
    custom = seen_timesteps(euler, sigmas=[14.0, 3.0, 0.5, 0.0])
    assert euler.scheduler.sigmas.tolist() == [14.0, 3.0, 0.5, 0.0]
    assert len(custom) == 3 and custom != default and custom[0] < default[0]
    # and for the images of `generate`
    recorder = Recorder()
    one_image(flow, sigmas=[1.0, 0.6, 0.3, 0.1], callback_on_step_end=recorder)
    assert [timestep for _, timestep, _ in recorder.calls] == pytest.approx([1000.0, 600.0, 300.0, 100.0])


def test_a_scheduler_without_custom_schedules_raises(components, pipe):
    ddim = make_pipe(components, scheduler=DDIMScheduler(clip_sample=False))
    with pytest.raises(ValueError, match="DDIMScheduler.*does not support custom timestep"):
        run(ddim, timesteps=[900, 100])
    with pytest.raises(ValueError, match="DDPMScheduler.*does not support custom sigmas"):
        run(pipe, sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="Only one of `timesteps` or `sigmas`"):
        run(pipe, timesteps=[900, 100], sigmas=[1.0, 0.5])


# -------------------------------------------------------------------------------------------- _compatibles
def exact_prediction(model_input, timestep, x0, prediction_type, alphas_cumprod):
    """What a perfect model returns for x_t at t: the target of `prediction_type` (the noiser's training targets)."""
    if prediction_type == "flow_prediction":
        sigma = float(timestep) / 1000  # x_t = (1 - sigma) x0 + sigma noise
        noise = (model_input - (1 - sigma) * x0) / sigma
        return noise - x0
    # Fractional timesteps (Euler, Heun, ...) map to sigma by interpolating log sigma, as diffusers does.
    log_sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).log().numpy()
    sigma = float(np.exp(np.interp(float(timestep), np.arange(len(log_sigmas)), log_sigmas)))
    alpha = 1 / (1 + sigma**2)
    noise = (model_input - alpha**0.5 * x0) / (1 - alpha) ** 0.5
    return noise if prediction_type == "epsilon" else alpha**0.5 * noise - (1 - alpha) ** 0.5 * x0


def training_schedulers():
    """(prediction type, training scheduler): the tests' DDPM (linear betas), the training script's cosine DDPM, and
    rectified flow."""
    for prediction_type in ("epsilon", "v_prediction"):
        yield prediction_type, DDPMScheduler(prediction_type=prediction_type, clip_sample=False)
        yield (
            prediction_type,
            DDPMScheduler(prediction_type=prediction_type, beta_schedule="squaredcos_cap_v2", clip_sample=False),
        )
    yield "flow_prediction", FlowMatchEulerDiscreteScheduler()


COMPATIBLE_CASES = [
    pytest.param(kind, train, name, id=f"{kind}-{train.config.get('beta_schedule', 'flow')}-{name}")
    for kind, train in training_schedulers()
    for name in TransfusionPipeline._compatibles[kind]
]


@pytest.mark.parametrize(("prediction_type", "train_scheduler", "name"), COMPATIBLE_CASES)
def test_compatible_schedulers_load_from_the_pipeline_config_and_sample_exactly(
    components, models, prediction_type, train_scheduler, name
):
    pipe = make_pipe(components, transformer=models[prediction_type], scheduler=train_scheduler)
    pipe.scheduler = TransfusionPipeline.scheduler_from_config(name, pipe.scheduler.config, prediction_type)
    assert type(pipe.scheduler).__name__ == name
    assert TransfusionPipeline.scheduler_prediction_type(pipe.scheduler) == prediction_type
    # A perfect model of one clean latent: every compatible sampler must land on it.
    x0 = torch.randn((1, 4, 4, 4), generator=get_generator(11)) * 2
    alphas = getattr(train_scheduler, "alphas_cumprod", torch.ones(1)).double()
    pipe._predict = lambda model_input, timestep, *args: exact_prediction(
        model_input.double(), timestep, x0.double(), prediction_type, alphas
    ).float()
    result = run(pipe, prompt="", num_inference_steps=10, guidance_scale=1.0, use_kv_cache=False)
    # Samplers that end at the smallest training noise (DEIS) land within sqrt(1 - alpha_bar_0) * noise of x0.
    assert (result - x0).abs().max() < 0.05


def test_the_exact_predictor_check_can_fail(components, models):
    """A scheduler built with its own defaults instead of the model's betas (diffusers' plain `from_config` on a
    default DDPM config gives Heun beta_end=0.012) misses x0 by far: the check above is informative."""
    train = DDPMScheduler(clip_sample=False)
    pipe = make_pipe(components, transformer=models["epsilon"], scheduler=train)
    pipe.scheduler = HeunDiscreteScheduler.from_config(train.config)
    assert pipe.scheduler.config.beta_end == 0.012
    x0 = torch.randn((1, 4, 4, 4), generator=get_generator(11)) * 2
    pipe._predict = lambda model_input, timestep, *args: exact_prediction(
        model_input.double(), timestep, x0.double(), "epsilon", train.alphas_cumprod.double()
    ).float()
    result = run(pipe, prompt="", num_inference_steps=10, guidance_scale=1.0, use_kv_cache=False)
    assert (result - x0).abs().max() > 1.0
    # scheduler_from_config keeps the model's noise schedule.
    heun = TransfusionPipeline.scheduler_from_config(HeunDiscreteScheduler, train.config, "epsilon")
    assert heun.config.beta_end == 0.02 and torch.equal(heun.alphas_cumprod, train.alphas_cumprod)


def test_scheduler_from_config_refuses_what_does_not_fit():
    ddpm, flow = DDPMScheduler().config, FlowMatchEulerDiscreteScheduler().config
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler does not fit.*'epsilon'.*DDIMScheduler"):
        TransfusionPipeline.scheduler_from_config("FlowMatchEulerDiscreteScheduler", ddpm, "epsilon")
    with pytest.raises(ValueError, match="DDIMScheduler does not fit.*'flow_prediction'"):
        TransfusionPipeline.scheduler_from_config(DDIMScheduler, flow, "flow_prediction")
    with pytest.raises(ValueError, match="`prediction_type` must be one of.*'sample'"):
        TransfusionPipeline.compatible_schedulers("sample")
    # The flow schedule's shift carries over to a solver, and back.
    solver = TransfusionPipeline.scheduler_from_config(
        "UniPCMultistepScheduler", FlowMatchEulerDiscreteScheduler(shift=3.0).config, "flow_prediction"
    )
    assert solver.config.flow_shift == 3.0 and solver.config.use_flow_sigmas is True
    back = TransfusionPipeline.scheduler_from_config(
        "FlowMatchEulerDiscreteScheduler", solver.config, "flow_prediction"
    )
    assert back.config.shift == 3.0


# ------------------------------------------------------------------------------------------- progress bar
def test_generate_respects_the_progress_bar_config(components, capsys):
    pipe = TransfusionPipeline(**dict(components, scheduler=get_scheduler()))
    [image] = one_image(pipe)
    assert isinstance(image, PIL.Image.Image)
    assert f"{STEPS}/{STEPS}" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    one_image(pipe)
    run(pipe)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


# ------------------------------------------------------------------------------------------ devices / offload
def test_offload_sequence_names_the_model_components(pipe):
    modules = {name for name, component in pipe.components.items() if isinstance(component, torch.nn.Module)}
    assert pipe.model_cpu_offload_seq.split("->") == ["transformer", "vae"] and modules == {"transformer", "vae"}
    assert pipe._execution_device == torch.device("cpu")


def test_execution_device_follows_the_offload_hooks(components):
    """With accelerate's offload hooks the weights stay put and the hook names where they run: the pipeline places
    its tensors there. On CPU the hooks run for real with the CPU as the execution device."""
    pipe = make_pipe(components, transformer=get_transformer(get_tokenizer()))
    expected = run(pipe, output_type="np")
    caption = pipe.caption(PIL.Image.new("RGB", (8, 8)), max_new_tokens=3)
    pipe.enable_model_cpu_offload(device="cpu")
    try:
        assert [hook.hook.execution_device for hook in pipe._all_hooks] == [torch.device("cpu", 0)] * 2
        assert pipe._execution_device == torch.device("cpu", 0)
        np.testing.assert_allclose(run(pipe, output_type="np"), expected, atol=1e-6)
        assert pipe.caption(PIL.Image.new("RGB", (8, 8)), max_new_tokens=3) == caption
        assert isinstance(one_image(pipe)[0], PIL.Image.Image)
    finally:
        pipe.remove_all_hooks()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_cpu_offload_on_cuda(components):
    """`enable_model_cpu_offload()`: same images as the pipeline moved to the GPU, weights back on the CPU after."""
    pipe = make_pipe(components, transformer=get_transformer(get_tokenizer()))
    pipe.to("cuda")
    assert pipe._execution_device.type == "cuda"
    expected = run(pipe, output_type="np")
    caption = pipe.caption(PIL.Image.new("RGB", (8, 8)), max_new_tokens=3)
    [generated] = one_image(pipe)
    pipe.enable_model_cpu_offload()
    assert pipe._execution_device.type == "cuda" and pipe.transformer.device.type == "cpu"
    np.testing.assert_allclose(run(pipe, output_type="np"), expected, atol=1e-4)
    assert pipe.caption(PIL.Image.new("RGB", (8, 8)), max_new_tokens=3) == caption
    np.testing.assert_allclose(np.asarray(one_image(pipe)[0]), np.asarray(generated), atol=1)
    assert pipe.transformer.device.type == "cpu" and pipe.vae.device.type == "cpu"
