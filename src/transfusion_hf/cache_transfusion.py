"""The prefix KV cache of the denoising loop: a `DynamicCache` whose full-attention layers keep free slots.

Every denoising step appends the image positions to the cached prompt and crops them off again (paper, section 3.4).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedConfig
from transformers.cache_utils import DynamicLayer


class _ReservedDynamicLayer(DynamicLayer):
    """A `DynamicLayer` that keeps `reserve` free slots after its content (benchmark fix).

    The denoising loop appends the image positions to the prefix cache and crops them off again at every step. A plain
    `DynamicLayer` appends with `torch.cat`, which copies the whole prefix each time (22% of a step at a 1024-token
    prompt, and growing with it); here the new states are copied into the free slots and `crop` (inherited) only
    shortens the view, so a step costs the same whatever the prefix length, apart from attention itself. The layer
    is used under `no_grad` only: the slots are overwritten in place.
    """

    def __init__(self, reserve: int):
        super().__init__()
        self.reserve = reserve
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        new_length = length + key_states.shape[-2]
        buffer = self._key_buffer
        # The content must still be the head of the buffer (not replaced by a reorder, reset, ...) and fit in it.
        fits = (
            buffer is not None
            and self.keys.data_ptr() == buffer.data_ptr()
            and self.keys.dtype == key_states.dtype
            and buffer.shape[:2] == key_states.shape[:2]
            and buffer.shape[-1] == key_states.shape[-1]
            and new_length <= buffer.shape[-2]
        )
        if not fits:
            shape = (*key_states.shape[:2], new_length + self.reserve, key_states.shape[-1])
            self._key_buffer = key_states.new_empty(shape)
            self._value_buffer = value_states.new_empty((*shape[:3], value_states.shape[-1]))
            if length:
                self._key_buffer[..., :length, :] = self.keys
                self._value_buffer[..., :length, :] = self.values
        self._key_buffer[..., length:new_length, :] = key_states
        self._value_buffer[..., length:new_length, :] = value_states
        self.keys = self._key_buffer[..., :new_length, :]
        self.values = self._value_buffer[..., :new_length, :]
        return self.keys, self.values


class ReservedDynamicCache(DynamicCache):
    """A `DynamicCache` whose full-attention layers keep `reserve` free slots after their content, so that appending
    and cropping the image positions at every denoising step never copies the prefix. Layers of other types (sliding
    window, ...) stay as `DynamicCache` builds them from the config.

    Args:
        config (`PreTrainedConfig`): the backbone's text config (layer types, as for `DynamicCache`).
        reserve (`int`): free slots per full-attention layer, the image positions of one step
            (`config.num_patches` of the Transfusion model).
    """

    def __init__(self, config: PreTrainedConfig, reserve: int):
        if not isinstance(reserve, int) or reserve < 0:
            raise ValueError(f"`reserve` must be a non-negative integer, got {reserve!r}.")
        super().__init__(config=config)
        self.layers = [
            _ReservedDynamicLayer(reserve) if type(layer) is DynamicLayer else layer for layer in self.layers
        ]


__all__ = ["ReservedDynamicCache"]
