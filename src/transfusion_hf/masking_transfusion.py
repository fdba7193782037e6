"""The Transfusion attention mask: causal over the sequence, bidirectional inside each image (paper, section 3.2).

Pure functions. The mask itself is built by transformers' `create_causal_mask(..., block_sequence_ids=...)`, so every
attention backend (eager, sdpa, flex) gets the mask type it expects and the backbone's attention is never forked.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedConfig
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask


def image_block_ids(input_ids: torch.LongTensor, image_token_id: int) -> torch.LongTensor:
    """Number the images of each row: every run of consecutive image placeholders is one block.

    Args:
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
            Token ids holding `<boi> <image>*N <eoi>` blocks.
        image_token_id (`int`):
            The placeholder id.

    Returns:
        `torch.LongTensor` of shape `(batch_size, sequence_length)`: `-1` at text positions, and `0, 1, ...` at the
        positions of the first, second, ... image of the row. A per-image id (never a single "is image" flag) keeps
        two images of one sequence from seeing each other's future patches.
    """
    is_image = input_ids == image_token_id
    previous_is_image = torch.zeros_like(is_image)
    previous_is_image[:, 1:] = is_image[:, :-1]
    block_starts = is_image & ~previous_is_image
    block_index = torch.cumsum(block_starts.long(), dim=1) - 1
    return torch.where(is_image, block_index, torch.full_like(block_index, -1))


def build_transfusion_mask(
    text_config: PreTrainedConfig,
    inputs_embeds: torch.Tensor,
    input_ids: torch.LongTensor,
    image_token_id: int,
    attention_mask: torch.Tensor | None = None,
    cache: Cache | None = None,
    position_ids: torch.LongTensor | None = None,
    bidirectional_images: bool = True,
) -> torch.Tensor | dict | None:
    """Build the backbone's attention mask for a mixed sequence.

    Args:
        text_config (`PreTrainedConfig`):
            The backbone config; its `_attn_implementation` selects the mask type (bool, float or BlockMask).
        inputs_embeds (`torch.Tensor` of shape `(batch_size, query_length, hidden_size)`):
            Used for batch size, length, dtype and device only.
        input_ids (`torch.LongTensor` of shape `(batch_size, query_length)`):
            The ids of the new positions (the cached prefix is not repeated).
        image_token_id (`int`):
            The image placeholder id.
        attention_mask (`torch.Tensor` of shape `(batch_size, past_length + query_length)`, *optional*):
            2D padding mask over the cached prefix and the new positions.
        cache (`Cache`, *optional*):
            The KV cache of the prefix.
        position_ids (`torch.LongTensor` of shape `(batch_size, query_length)`, *optional*):
            Positions of the new tokens.
        bidirectional_images (`bool`, defaults to `True`):
            Patches of one image attend to each other (paper, section 3.2); `False` gives plain causal attention
            everywhere (the paper's ablation, Table 5).

    Returns:
        What the backbone takes as `attention_mask`: a 4D mask or BlockMask, or a dict keyed by layer type for
        backbones with sliding-window layers.
    """
    block_ids = image_block_ids(input_ids, image_token_id)
    if not bidirectional_images:
        block_ids = torch.full_like(block_ids, -1)
    past_length = cache.get_seq_length() if cache is not None else 0
    if past_length:
        # The cached prefix only ever acts as keys of the new queries, which all come after it: marking it as
        # text (-1) keeps it fully visible and causal. The ids must span prefix + new positions (absolute indices).
        prefix = torch.full((block_ids.shape[0], past_length), -1, dtype=block_ids.dtype, device=block_ids.device)
        block_ids = torch.cat([prefix, block_ids], dim=1)
    mask_kwargs = {
        "config": text_config,
        "inputs_embeds": inputs_embeds,
        "attention_mask": attention_mask,
        "cache": cache,
        "position_ids": position_ids,
        "block_sequence_ids": block_ids,
    }
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types is None and getattr(text_config, "sliding_window", None) is not None:
        # Mistral-style backbones (Mistral, Mixtral, Phi3, Starcoder2, Qwen3-MoE) have no `layer_types`
        # and use a sliding-window mask on every layer whenever `sliding_window` is set (Mistral: 4096 by default).
        # A full causal mask here made mixed inputs attend beyond the window the backbone uses for text.
        return create_sliding_window_causal_mask(**mask_kwargs)
    full_mask = create_causal_mask(**mask_kwargs)
    if "sliding_attention" not in (layer_types or ()):
        return full_mask
    return {"full_attention": full_mask, "sliding_attention": create_sliding_window_causal_mask(**mask_kwargs)}


def naive_transfusion_mask(input_ids: torch.LongTensor, image_token_id: int) -> torch.BoolTensor:
    """Reference mask from the paper's definition, one pair at a time (for tests and documentation).

    `allowed[i, j] = (j <= i) or (image_id[i] == image_id[j] != none)`.

    Args:
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`).
        image_token_id (`int`).

    Returns:
        `torch.BoolTensor` of shape `(batch_size, sequence_length, sequence_length)`, True where query i may attend
        to key j.
    """
    batch_size, length = input_ids.shape
    allowed = torch.zeros(batch_size, length, length, dtype=torch.bool)
    for row in range(batch_size):
        image_of = []
        current, inside = -1, False
        for token in input_ids[row].tolist():
            if token == image_token_id:
                if not inside:
                    current += 1
                inside = True
                image_of.append(current)
            else:
                inside = False
                image_of.append(None)
        for i in range(length):
            for j in range(length):
                same_image = image_of[i] is not None and image_of[i] == image_of[j]
                allowed[row, i, j] = j <= i or same_image
    return allowed


__all__ = ["image_block_ids", "build_transfusion_mask", "naive_transfusion_mask"]
