"""Modality-specific weights with one shared attention (LMFusion, Shi et al., 2024; BAGEL's mixture-of-transformers).

With `TransfusionConfig(modality_experts=True)` every decoder layer of the backbone gets an image copy of its per-position
modules (Llama, Qwen2, Mistral: `input_layernorm`, `self_attn.{q,k,v,o}_proj`, `post_attention_layernorm`, `mlp`),
and so does the backbone's final `norm`. Text positions go through the original modules, image positions through
their copies; attention itself stays one softmax over the whole sequence with the Transfusion mask, because queries,
keys and values of both modalities meet in the backbone's own attention function. Starting from a pretrained LLM with
the text weights frozen, text-only input gives exactly the LLM's logits however long the images train.

How, without forking the backbone's modeling file:

- Each routed module keeps its object, its class's forward and its state-dict keys (`...q_proj.weight`), so a
  pretrained LLM's weights load into the text path unchanged; the copy is its child `image_expert`
  (`...q_proj.image_expert.weight`), made with `copy.deepcopy` as peft's `modules_to_save` does.
- Its class is swapped for a generated subclass (`torch.nn.utils.parametrize` does the same) whose forward gathers the
  text and the image positions, runs each through its own weights, and scatters the results back. The subclass keeps
  the base class's `__name__`, so lookups by class name (FSDP's `transformer_layer_cls_to_wrap`, `_no_split_modules`,
  transformers' "RMSNorm" init rule) still match.
- Which positions are images travels as the `modality_routing` keyword ([`ModalityRouting`]) that
  `TransfusionForMixedModal.forward` passes to the backbone and the backbone hands to every decoder layer. The routed
  decoder layer reads it in its own forward, so a gradient-checkpointing replay (which re-runs the layer's forward
  with the same keywords, outside module hooks) routes exactly as the first pass did.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

IMAGE_EXPERT_NAME = "image_expert"
_ROUTED_CLASSES: dict[tuple[type, type], type] = {}


@dataclass(frozen=True)
class ModalityRouting:
    """Which positions of one forward pass are image positions, as flat indices into `batch_size * sequence_length`.

    Built once per forward, then shared by every routed module of every layer. Given the number of image positions
    (the model knows it from the shape of `latents`), the indices have static shapes: no host sync, and a compiled
    step neither breaks its graph nor recompiles for another layout of the same sizes.

    Args:
        image_index (`torch.LongTensor` of shape `(num_image_positions,)`): flat indices of the image positions.
        text_index (`torch.LongTensor` of shape `(num_text_positions,)`): flat indices of the other positions.
        shape (`tuple[int, int]`): `(batch_size, sequence_length)` of the forward pass.
    """

    image_index: torch.LongTensor
    text_index: torch.LongTensor
    shape: tuple[int, int]

    @classmethod
    def from_image_positions(
        cls, image_positions: torch.BoolTensor, num_image_positions: int | None = None
    ) -> ModalityRouting:
        """
        Args:
            image_positions (`torch.BoolTensor` of shape `(batch_size, sequence_length)`): True at image positions.
            num_image_positions (`int`, *optional*): how many of them are True, when the caller knows it; the indices
                then come from `torch.nonzero_static` (static shapes) instead of `nonzero` (a host sync).
        """
        if image_positions.dim() != 2 or image_positions.dtype != torch.bool:
            raise ValueError(
                "`image_positions` must be a (batch_size, sequence_length) bool tensor, got "
                f"{image_positions.dtype} of shape {tuple(image_positions.shape)}."
            )
        flat = image_positions.reshape(-1)
        if num_image_positions is None:
            image_index, text_index = flat.nonzero().squeeze(1), (~flat).nonzero().squeeze(1)
        else:
            image_index = torch.nonzero_static(flat, size=num_image_positions).squeeze(1)
            text_index = torch.nonzero_static(~flat, size=flat.numel() - num_image_positions).squeeze(1)
        return cls(
            image_index=image_index, text_index=text_index, shape=(image_positions.shape[0], image_positions.shape[1])
        )


class _RoutingSlot:
    """The routing of the forward pass in progress, shared by the routed modules of one backbone. A plain object (not
    a module or a tensor), so it is neither saved nor moved between devices."""

    def __init__(self) -> None:
        self.routing: ModalityRouting | None = None


class ModalityRoutedModule:
    """Mixin of the generated subclasses of routed modules: text positions through the module's own weights, image
    positions through its `image_expert` copy. Only position-wise modules (projections, MLPs, norms) can be routed:
    their input is `(batch_size, sequence_length, ...)`."""

    _modality_routing_slot: _RoutingSlot

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        routing = self._modality_routing_slot.routing
        if routing is None or routing.image_index.numel() == 0:
            return super().forward(hidden_states)
        if tuple(hidden_states.shape[:2]) != routing.shape:
            raise ValueError(
                f"{type(self).__name__} got hidden states of shape {tuple(hidden_states.shape)}, but the modality "
                f"routing is for (batch_size, sequence_length) = {routing.shape}."
            )
        expert = getattr(self, IMAGE_EXPERT_NAME)
        if routing.text_index.numel() == 0:  # a denoising step with a prefix cache: image positions only
            return expert(hidden_states)
        flat = hidden_states.flatten(0, 1)
        # Each weight set runs on its own positions only (gather), then the outputs are put back in place (scatter).
        text_output = super().forward(flat.index_select(0, routing.text_index))
        image_output = expert(flat.index_select(0, routing.image_index))
        output = text_output.new_empty((flat.shape[0], *text_output.shape[1:]))
        output = output.index_copy(0, routing.text_index, text_output)
        output = output.index_copy(0, routing.image_index, image_output.to(output.dtype))
        return output.unflatten(0, routing.shape)


class ModalityRoutedDecoderLayer:
    """Mixin of the generated decoder-layer subclasses: takes the `modality_routing` keyword and makes it visible to
    the layer's routed modules while the layer runs (the keyword is not passed on to the attention function).

    Subclassing a transformers `GradientCheckpointingLayer` wraps this forward in the checkpoint, so the replay
    during backward sets the same routing again."""

    _modality_routing_slot: _RoutingSlot

    def forward(self, *args, modality_routing: ModalityRouting | None = None, **kwargs):
        slot = self._modality_routing_slot
        previous, slot.routing = slot.routing, modality_routing
        try:
            return super().forward(*args, **kwargs)
        finally:
            slot.routing = previous


def _routed_class(base: type, mixin: type) -> type:
    """The subclass of `base` with `mixin` first, made once per class. It keeps `base.__name__` so name-based lookups
    (FSDP wrap policies, `_no_split_modules`, transformers' norm init) treat it as the original."""
    key = (base, mixin)
    if key not in _ROUTED_CLASSES:
        routed = type(base.__name__, (mixin, base), {"__module__": __name__, "__doc__": base.__doc__})
        routed.__qualname__ = base.__qualname__
        _ROUTED_CLASSES[key] = routed
    return _ROUTED_CLASSES[key]


def is_modality_routed(module: nn.Module) -> bool:
    """Whether `module` routes image positions to an `image_expert` copy."""
    return isinstance(module, ModalityRoutedModule)


def _route(module: nn.Module, slot: _RoutingSlot) -> None:
    """Give `module` an image copy of itself and route image positions through it."""
    if is_modality_routed(module):
        raise ValueError(f"{type(module).__name__} already has modality experts.")
    expert = copy.deepcopy(module)  # before the class swap: the copy is a plain module of the original class
    module.__class__ = _routed_class(type(module), ModalityRoutedModule)
    module._modality_routing_slot = slot
    module.add_module(IMAGE_EXPERT_NAME, expert)


def _routed_children(layer: nn.Module) -> list[nn.Module]:
    """The per-position modules of a decoder layer: every child holding weights except the attention, and every
    child of the attention (its projections, and q/k norms where a backbone has them)."""
    attention = getattr(layer, "self_attn", None)
    if not isinstance(attention, nn.Module):
        raise ValueError(
            f"modality_experts needs decoder layers with a `self_attn` module (Llama, Qwen2, Mistral), got "
            f"{type(layer).__name__} with children {[name for name, _ in layer.named_children()]}."
        )
    children = [child for name, child in layer.named_children() if name != "self_attn"]
    children += list(attention.children())
    routed = [child for child in children if any(True for _ in child.parameters())]
    # A weight held directly by the layer or the attention module (e.g. attention sinks) would be shared by both
    # modalities without anyone noticing: refuse such backbones.
    direct = [name for name, _ in layer.named_parameters(recurse=False)]
    direct += [f"self_attn.{name}" for name, _ in attention.named_parameters(recurse=False)]
    if direct:
        raise ValueError(
            f"modality_experts cannot route the weights {direct} of {type(layer).__name__}: only weights inside "
            "per-position sub-modules (projections, MLP, norms) get an image copy."
        )
    return routed


def add_modality_experts(backbone: nn.Module) -> nn.Module:
    """Give every decoder layer of `backbone` (and its final `norm`) image copies of its per-position modules.

    The copies start as exact copies of the current weights. Text positions keep using the original modules, whose
    state-dict keys do not change; a forward routes image positions once it is given `modality_routing=`
    ([`ModalityRouting`]), which [`TransfusionForMixedModal`] does when `config.modality_experts` is set.

    Args:
        backbone (`nn.Module`): a transformers decoder model (`LlamaModel`, `Qwen2Model`, `MistralModel`, ...) with
            its decoder layers in `.layers`.

    Returns:
        The same backbone, changed in place.
    """
    layers = getattr(backbone, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"modality_experts needs a backbone with its decoder layers in `.layers`, got {type(backbone).__name__}."
        )
    slot = _RoutingSlot()
    for layer in layers:
        for module in _routed_children(layer):
            _route(module, slot)
        layer.__class__ = _routed_class(type(layer), ModalityRoutedDecoderLayer)
        layer._modality_routing_slot = slot
    final_norm = getattr(backbone, "norm", None)
    if isinstance(final_norm, nn.Module):
        _route(final_norm, slot)

        # The final norm runs after the layers, outside any checkpointed layer: the backbone's own call sets the
        # routing for it (module hooks run once per call; this module is never replayed).
        def set_routing(module: nn.Module, args: tuple, kwargs: dict) -> None:
            slot.routing = kwargs.get("modality_routing")

        def clear_routing(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            slot.routing = None

        backbone.register_forward_pre_hook(set_routing, with_kwargs=True)
        backbone.register_forward_hook(clear_routing, with_kwargs=True, always_call=True)
    return backbone


def image_expert_pairs(module: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """`(name, text_module, image_expert)` for every routed module inside `module`."""
    return [
        (name, routed, getattr(routed, IMAGE_EXPERT_NAME))
        for name, routed in module.named_modules()
        if is_modality_routed(routed)
    ]


@torch.no_grad()
def copy_text_weights_to_image_experts(module: nn.Module, names: set[str] | None = None) -> list[str]:
    """Set every image copy to the weights of its text module (LMFusion's initialisation).

    Args:
        module (`nn.Module`): the model or backbone holding routed modules.
        names (`set[str]`, *optional*): only the image copies with these parameter names (relative to `module`, e.g.
            `"model.layers.0.mlp.image_expert.up_proj.weight"`); all of them when None.

    Returns:
        The parameter names that were copied.
    """
    copied = []
    for prefix, text_module, expert in image_expert_pairs(module):
        text_parameters = dict(text_module.named_parameters())
        for name, parameter in expert.named_parameters():
            full_name = f"{prefix}.{IMAGE_EXPERT_NAME}.{name}" if prefix else f"{IMAGE_EXPERT_NAME}.{name}"
            if names is None or full_name in names:
                parameter.copy_(text_parameters[name])
                copied.append(full_name)
    return copied


def freeze_text_weights(model: nn.Module, trainable_token_ids: list[int] | tuple[int, ...] = ()) -> list[nn.Parameter]:
    """Freeze the pretrained text path of a [`TransfusionForMixedModal`] with modality experts; train the image path.

    Trainable afterwards: the image copies, the patch encoder/decoder, the patch-position embedding, and the rows of
    `trainable_token_ids` (the new `<boi>`, `<eoi>`, `<image>`) in the input embeddings and the LM head. Every other
    backbone weight (layers, final norm, the other embedding and LM-head rows) is frozen, so text-only input gives
    the pretrained LLM's logits over its vocabulary, exactly.

    Args:
        model (`TransfusionForMixedModal`): a model built with `config.modality_experts=True`.
        trainable_token_ids (`list[int]`): vocabulary rows that train in the input embeddings and the LM head.

    Returns:
        The parameters of which only some rows train (the input embeddings, and the LM head when not tied). Give them
        no weight decay: AdamW's decoupled decay shrinks every row, gradient or not.
    """
    if not getattr(model.config, "modality_experts", False):
        raise ValueError(
            "freeze_text_weights needs a model with `modality_experts=True`: without image copies, freezing the "
            "text weights would freeze the whole backbone."
        )
    model.requires_grad_(False)
    for _, _, expert in image_expert_pairs(model):
        expert.requires_grad_(True)
    for name in ("image_encoder", "image_decoder", "patch_position_embedding"):
        part = getattr(model, name, None)
        if part is not None:
            part.requires_grad_(True)
    row_trained = []
    if trainable_token_ids:
        vocab_size = model.get_input_embeddings().weight.shape[0]
        bad = [token for token in trainable_token_ids if not 0 <= token < vocab_size]
        if bad:
            raise ValueError(f"`trainable_token_ids` {bad} are outside the vocabulary (size {vocab_size}).")
        weights = {id(w): w for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)}
        for weight in weights.values():
            rows = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
            rows[list(trainable_token_ids)] = 1
            weight.requires_grad_(True)
            # The other rows get an exactly zero gradient: with no weight decay Adam then never moves them.
            weight.register_hook(lambda grad, rows=rows: grad * rows.to(grad.device, grad.dtype))
            row_trained.append(weight)
    return row_trained


__all__ = [
    "ModalityRouting",
    "add_modality_experts",
    "copy_text_weights_to_image_experts",
    "freeze_text_weights",
    "image_expert_pairs",
    "is_modality_routed",
]
