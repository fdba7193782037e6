"""Peer side of the benchmarks: lucidrains' ``transfusion-pytorch`` (pinned to 0.20.0).

Everything the benchmark needs from the peer goes through the functions below, so the comparison scripts never touch
its API directly. ``transfusion_pytorch`` is imported lazily inside them: importing this module has no side effects and
works without the peer installed (install it with ``pip install transfusion-hf[bench]``).

Layout benchmarked: every sample is ``text_length`` text tokens followed by one image, given to the peer as a latent of
shape ``(C, H, W)``. A parameter-free patchify (``modality_encoder``) turns it into ``(H/p, W/p, C*p*p)``, and the
peer's own ``Linear(C*p*p, dim)`` (``latent_to_model``) is the linear patch embedding, so the image costs
``(H/p) * (W/p)`` transformer positions. The peer wraps the sample itself as
``[sos] text [meta] "h,w" [som] <patches> [eom] [eos]``, i.e. ``5 + len("h,w")`` extra positions per sample.

Sampling path (see ``peer_sample_image``): ``Transfusion.sample_many`` with the image forced at the start. It is the
peer's only path that caches the prompt for *both* guidance branches: one forward builds the conditional KV cache, one
more builds the unconditional (null-text) cache, then each ODE function evaluation runs the image positions through the
transformer twice (conditional + unconditional, two separate batch-1 calls, not one batch-2 call). With the Euler solver
(our default) that is 2 transformer forward passes per step with guidance, 1 without (``cfg_scale == 1``); the peer's
own default solver, midpoint, doubles both numbers.
"""

from __future__ import annotations

import statistics
import time
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from torch.optim import Optimizer

PEER_VERSION = "0.20.0"

# A sample in the peer's input format: a text id tensor of shape (n,) followed by one (C, H, W) float latent.
PeerSample = list[torch.Tensor]


def _import_peer() -> ModuleType:
    """Import ``transfusion_pytorch`` on first use, with a clear message when it is missing.

    Also silences the peer's per-sample tqdm bars and loguru info lines: they would go to stderr from inside the timed
    sampling loop and are noise in benchmark output. Only the peer's module is affected.
    """
    try:
        import transfusion_pytorch
        import transfusion_pytorch.transfusion as peer_module
    except ImportError as error:
        raise ImportError(
            "The peer benchmark needs transfusion-pytorch "
            f"(tested with {PEER_VERSION}): pip install transfusion-hf[bench]"
        ) from error

    if not getattr(peer_module, "_bench_quiet", False):
        from functools import partial

        from loguru import logger
        from tqdm import tqdm

        peer_module.tqdm = partial(tqdm, disable=True)
        logger.disable("transfusion_pytorch")
        peer_module._bench_quiet = True
    return transfusion_pytorch


def _grid_size(latent_size: int, patch_size: int) -> int:
    """Patches per side; the peer has no padding path, so the latent must tile exactly."""
    if latent_size % patch_size != 0:
        raise ValueError(f"latent_size {latent_size} is not divisible by patch_size {patch_size}")
    return latent_size // patch_size


def build_peer_model(
    dim: int,
    depth: int,
    heads: int,
    dim_head: int,
    vocab_size: int,
    latent_channels: int,
    latent_size: int,
    patch_size: int,
    *,
    add_pos_emb: bool = True,
    ode_method: str = "euler",
    prob_uncond: float = 0.1,
    use_flex_attn: bool = False,
) -> nn.Module:
    """Build a ``transfusion_pytorch.Transfusion`` for text + one ``(latent_channels, latent_size, latent_size)`` image.

    Args:
        dim, depth, heads, dim_head: transformer width, number of layers, attention heads and per-head width. The peer's
            block is fixed otherwise: GEGLU feed-forward of inner width ``int(dim * 4 * 2 / 3)``, adaptive (time
            conditioned) norms, gated values, U-Net style skips between the two halves of the stack.
        vocab_size: number of ordinary text tokens. The peer appends its own specials (sos/eos/null, som/eom per
            modality, a meta token and 128 character tokens for the shape string) after them.
        latent_channels, latent_size, patch_size: the image latent is ``(C, H, W)`` with ``H == W == latent_size``,
            cut into ``patch_size`` squares.
        add_pos_emb: add the peer's continuous 2D axial position embedding to the image positions. Keep it on: the
            peer gives all positions of one image the same rotary position, so without it patches have no location.
        ode_method: torchdiffeq fixed-grid solver used for sampling. ``"euler"`` costs one model evaluation per step
            (what a flow-matching sampler with N steps means on our side); the peer's default is ``"midpoint"`` (two).
        prob_uncond: probability of nulling the text of a training sample, so that classifier-free guidance works.
        use_flex_attn: use flex attention (``torch.compile``d, block-sparse masks) instead of a dense masked
            ``(b, h, n, n)`` attention. The peer only takes that path for CUDA inputs and ignores it on CPU; the first
            CUDA step then pays the compile time, so warm up before timing.

    Returns:
        The peer model (an ``nn.Module``) on CPU, in training mode.
    """
    peer = _import_peer()
    from einops.layers.torch import Rearrange

    grid = _grid_size(latent_size, patch_size)
    # Parameter-free patchify / unpatchify around the peer's Linear latent projection. The peer calls them on stacked
    # batches (training) or with a temporary batch dim (sampling), hence the leading ``b``.
    patchify = Rearrange("b c (h p1) (w p2) -> b h w (c p1 p2)", p1=patch_size, p2=patch_size)
    unpatchify = Rearrange("b h w (c p1 p2) -> b c (h p1) (w p2)", p1=patch_size, p2=patch_size)

    return peer.Transfusion(
        num_text_tokens=vocab_size,
        transformer=dict(dim=dim, depth=depth, heads=heads, dim_head=dim_head, use_flex_attn=use_flex_attn),
        dim_latent=latent_channels * patch_size * patch_size,
        channel_first_latent=False,  # the patchify above already puts the features last
        modality_default_shape=(grid, grid),
        add_pos_emb=add_pos_emb,
        modality_encoder=patchify,
        modality_decoder=unpatchify,
        # atol / rtol only matter to adaptive solvers; kept at the peer's defaults.
        odeint_kwargs=dict(atol=1e-5, rtol=1e-5, method=ode_method),
        prob_uncond=prob_uncond,
    )


def peer_parameter_count(model: nn.Module) -> int:
    """Number of trainable parameters of the peer model (its patchify / unpatchify have none)."""
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


def peer_sequence_length(text_length: int, latent_size: int, patch_size: int) -> int:
    """Transformer positions the peer runs per training sample for the text + one image layout.

    The peer adds ``[sos]``, ``[meta]``, the shape string ``"h,w"`` in character tokens, ``[som]``, ``[eom]`` and
    ``[eos]`` around the content, then drops one position for the next-token shift.
    """
    grid = _grid_size(latent_size, patch_size)
    shape_chars = len(f"{grid},{grid}")
    return (1 + text_length + 1 + shape_chars + 1 + grid * grid + 1 + 1) - 1


def make_peer_batch(
    batch_size: int,
    text_length: int,
    vocab_size: int = 256,
    latent_channels: int = 4,
    latent_size: int = 8,
    *,
    generator: torch.Generator | None = None,
) -> list[PeerSample]:
    """Random batch in the peer's training input format: ``[[text_ids (n,), latent (C, H, W)], ...]``.

    Text ids are in ``[0, vocab_size)``: the peer adds its special tokens itself. The peer batches the samples
    internally (right-padding the packed sequences), so a list of per-sample lists is its native batch format.
    """
    batch = []
    for _ in range(batch_size):
        text = torch.randint(0, vocab_size, (text_length,), generator=generator)
        latent = torch.randn(latent_channels, latent_size, latent_size, generator=generator)
        batch.append([text, latent])
    return batch


def peer_train_step(model: nn.Module, optimizer: Optimizer, batch: list[PeerSample]) -> float:
    """One optimisation step on ``batch``: forward (text CE + flow MSE), backward, ``optimizer.step()``.

    The peer draws the noise level, the noise and the text dropout for guidance inside ``forward``, so the batch only
    carries clean data. Returns the total loss as a float.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = model(batch)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def peer_sample_image(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    num_steps: int,
    cfg_scale: float,
) -> torch.Tensor:
    """Sample the image for a text prompt with the peer's fastest path; returns ``(C, H, W)`` (or ``(B, C, H, W)``).

    Uses ``Transfusion.sample_many`` with ``force_modality_at_start=(0, (h, w))``, which appends ``[meta] "h,w" [som]``
    to the prompt so decoding starts with the image, and with ``max_length`` just under the image length so it stops
    right after it instead of decoding more text. ``sample_many`` always caches the prompt: one transformer forward
    for the conditional KV cache, one for the unconditional (null text) cache when ``cfg_scale != 1``. Each ODE
    evaluation then runs only the image positions, once per guidance branch; so per step this makes
    ``(2 if cfg_scale != 1 else 1) * (1 for euler, 2 for midpoint)`` transformer forward passes.
    (``sample_one(cache_kv=True)`` is slower here: with the image forced at the start it never decodes text, so its
    conditional branch reruns the whole prompt at every evaluation.)

    Args:
        model: a model from ``build_peer_model``.
        prompt_ids: text ids, shape ``(n,)`` for one image or ``(B, n)`` for a batch sampled together.
        num_steps: ODE steps. The peer's ``modality_steps`` counts grid points, so it gets ``num_steps + 1``.
        cfg_scale: classifier-free guidance scale; ``1.0`` turns guidance (and its second forward) off.
    """
    _import_peer()
    if num_steps < 1:
        raise ValueError("num_steps must be at least 1")
    mod = model.get_modality_info(0)
    grid_shape = tuple(mod.default_shape)
    image_length = grid_shape[0] * grid_shape[1]

    is_batched = prompt_ids.ndim == 2
    prompts = list(prompt_ids.to(model.device).long()) if is_batched else [prompt_ids.to(model.device).long()]

    samples = model.sample_many(
        prompts,
        force_modality_at_start=(0, grid_shape),
        modality_steps=num_steps + 1,
        cfg_scale=cfg_scale,
        max_length=image_length - 1,  # stop once the image is done: no text is decoded after it
        return_without_prompt=True,
    )
    # Each sample is [ModalityItem]; ``.tensor`` has already been through the unpatchify decoder.
    images = [sample[0].tensor for sample in samples]
    return torch.stack(images) if is_batched else images[0]


def count_peer_transformer_calls(model: nn.Module, prompt_ids: torch.Tensor, num_steps: int, cfg_scale: float) -> int:
    """How many times ``peer_sample_image`` runs the peer's transformer stack (a forward hook counts them)."""
    calls = 0

    def hook(*_: object) -> None:
        nonlocal calls
        calls += 1

    handle = model.transformer.register_forward_hook(hook)
    try:
        peer_sample_image(model, prompt_ids, num_steps, cfg_scale)
    finally:
        handle.remove()
    return calls


def _self_check() -> None:
    """Tiny end-to-end run: training throughput and time per sampled image on 2 CPU threads."""
    torch.set_num_threads(2)
    torch.manual_seed(0)

    dim, depth, heads, dim_head, vocab_size = 64, 2, 4, 16, 256
    channels, size, patch = 4, 8, 2
    batch_size, text_length = 8, 32
    train_steps, warmup_steps = 10, 2
    num_steps, cfg_scale, images = 16, 3.0, 5

    model = build_peer_model(dim, depth, heads, dim_head, vocab_size, channels, size, patch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    patches = _grid_size(size, patch) ** 2
    print(f"transfusion-pytorch {PEER_VERSION}: {peer_parameter_count(model):,} parameters")
    print(
        f"layout: {text_length} text + {patches} patches per sample; "
        f"peer sequence length {peer_sequence_length(text_length, size, patch)}"
    )

    generator = torch.Generator().manual_seed(0)
    batch = make_peer_batch(batch_size, text_length, vocab_size, channels, size, generator=generator)
    # Warm-up first: the peer's 'auto' batch processing times three strategies on the first batch of each shape.
    for _ in range(warmup_steps):
        peer_train_step(model, optimizer, batch)
    # Medians, not means: the machine is shared, and one preempted step would skew a mean of ten.
    step_times = []
    for _ in range(train_steps):
        start = time.perf_counter()
        loss = peer_train_step(model, optimizer, batch)
        step_times.append(time.perf_counter() - start)
    step_time = statistics.median(step_times)
    content_tokens = batch_size * (text_length + patches)
    print(
        f"train: {step_time * 1e3:.1f} ms/step (median of {train_steps}), {content_tokens / step_time:,.0f} tokens/s "
        f"(text + patches; batch {batch_size}), last loss {loss:.3f}"
    )

    prompt = torch.randint(0, vocab_size, (text_length,), generator=generator)
    calls = count_peer_transformer_calls(model, prompt, num_steps, cfg_scale)
    calls_1 = count_peer_transformer_calls(model, prompt, 1, cfg_scale)
    per_step = (calls - calls_1) // (num_steps - 1)
    print(f"sample: {calls} transformer calls for {num_steps} steps at cfg {cfg_scale} ({per_step} per step)")

    image = peer_sample_image(model, prompt, num_steps, cfg_scale)  # warm-up
    assert image.shape == (channels, size, size), image.shape
    image_times = []
    for _ in range(images):
        start = time.perf_counter()
        image = peer_sample_image(model, prompt, num_steps, cfg_scale)
        image_times.append(time.perf_counter() - start)
    print(
        f"sample: {statistics.median(image_times):.3f} s/image (median of {images}; {num_steps} steps, cfg {cfg_scale}), "
        f"output {tuple(image.shape)}"
    )


if __name__ == "__main__":
    _self_check()
