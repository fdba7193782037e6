"""ReservedDynamicCache: the denoising loop appends image positions to the prefix cache and crops them off again at
every step, without copying the prefix."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

from tiny_configs import llama_text_config
from transfusion_hf.cache_transfusion import ReservedDynamicCache

RESERVE = 4


def states(length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values `(batch 2, kv heads 2, length, head dim 8)`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 2, length, 8, generator=generator), torch.randn(2, 2, length, 8, generator=generator)


def test_steps_write_into_the_free_slots_and_match_a_dynamic_cache():
    config = AutoConfig.for_model(**llama_text_config())
    reserved, plain = ReservedDynamicCache(config, reserve=RESERVE), DynamicCache(config=config)
    for cache in (reserved, plain):
        cache.update(*states(5, seed=0), layer_idx=0)
    buffer = reserved.layers[0]._key_buffer.data_ptr()
    for step in range(3):  # a denoising step: append the image positions, read them, crop them off
        for cache in (reserved, plain):
            keys, values = cache.update(*states(RESERVE, seed=step + 1), layer_idx=0)
            if cache is reserved:
                reserved_keys, reserved_values = keys.clone(), values.clone()
            cache.crop(-RESERVE)
        torch.testing.assert_close(reserved_keys, keys, atol=0, rtol=0)
        torch.testing.assert_close(reserved_values, values, atol=0, rtol=0)
        assert reserved.get_seq_length() == plain.get_seq_length() == 5
        # No reallocation: the prefix is never copied.
        assert reserved.layers[0]._key_buffer.data_ptr() == buffer
    # More than the free slots: a bigger buffer, the content kept.
    for cache in (reserved, plain):
        keys, _ = cache.update(*states(RESERVE + 3, seed=9), layer_idx=0)
    assert reserved.layers[0]._key_buffer.data_ptr() != buffer
    torch.testing.assert_close(reserved.layers[0].keys, keys, atol=0, rtol=0)


def test_only_full_attention_layers_reserve_slots():
    config = AutoConfig.for_model(
        **llama_text_config(model_type="qwen2"), use_sliding_window=True, sliding_window=8, max_window_layers=1
    )
    cache = ReservedDynamicCache(config, reserve=RESERVE)
    assert [type(layer).__name__ for layer in cache.layers] == ["_ReservedDynamicLayer", "DynamicSlidingWindowLayer"]
    assert isinstance(cache.layers[1], DynamicSlidingWindowLayer) and cache.layers[0].reserve == RESERVE


@pytest.mark.parametrize("reserve", [-1, 2.5])
def test_bad_reserve_raises(reserve):
    with pytest.raises(ValueError, match=f"`reserve` must be a non-negative integer, got {reserve}"):
        ReservedDynamicCache(AutoConfig.for_model(**llama_text_config()), reserve=reserve)
