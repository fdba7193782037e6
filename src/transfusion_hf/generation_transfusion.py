"""The next text token of interleaved generation: greedy, or sampled with temperature and top-k.

`TransfusionPipeline.generate` picks text tokens one at a time with this function, between the images it denoises
(transformers' `generate` cannot stop for an image).
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessorList


def sample_next_token(
    logits: torch.Tensor,
    context_ids: list[int],
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    logits_processor: LogitsProcessorList | None,
    generator: torch.Generator | None,
) -> int:
    """The next token id after `context_ids`.

    Args:
        logits (`torch.Tensor` of shape `(1, vocab_size)`): the next-token logits.
        context_ids (`list[int]`): the sequence so far, for `logits_processor`.
        do_sample (`bool`): sample from the softmax; greedy (argmax) otherwise.
        temperature (`float`): divides the logits before sampling (floored at 1e-5).
        top_k (`int`, *optional*): sample among the `top_k` most likely tokens only.
        logits_processor (`LogitsProcessorList`, *optional*): transformers logits processors, applied first.
        generator (`torch.Generator`, *optional*): for the draw, which runs on the CPU.
    """
    if logits_processor is not None:
        logits = logits_processor(torch.tensor([context_ids], device=logits.device), logits)
    if not do_sample:
        return int(logits.argmax(dim=-1))
    logits = logits / max(temperature, 1e-5)
    if top_k is not None:
        threshold = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1, None]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    probabilities = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probabilities.cpu(), 1, generator=generator))


__all__ = ["sample_next_token"]
