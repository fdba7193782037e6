"""Configuration of a Transfusion model: any decoder LLM backbone plus the image (diffusion) fields."""

from __future__ import annotations

from typing import ClassVar

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

PATCH_ENCODERS = ("linear", "unet")
PREDICTION_TYPES = ("epsilon", "v_prediction", "flow_prediction")
UNET_SKIP_CONNECTIONS = ("all", "coarse", "fine", "none")
IMAGE_ATTENTIONS = ("bidirectional", "causal")
PATCH_POSITION_EMBEDDING_TYPES = ("learned", "factorized", "interpolated")


class TransfusionConfig(PreTrainedConfig):
    r"""
    Configuration of [`TransfusionForMixedModal`]: one decoder transformer that predicts the next text token and
    denoises image latents (Zhou et al., 2024, "Transfusion").

    Args:
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            The backbone: any transformers decoder config (Llama by default; Qwen2, Mistral, ... work the same).
            A dict is resolved through `AutoConfig` by its `model_type`.
        latent_channels (`int`, defaults to 4):
            Channels of the image latents (of the VAE, or 3 in pixel space).
        latent_size (`int`, defaults to 8):
            Side of the square latent grid of an image whose size is not given (the pipeline's default
            `height`/`width` is `latent_size` times the VAE's scale).
        max_latent_size (`int`, *optional*):
            Largest height and width of an image's latent grid. Each image may have its own latent grid `(H, W)`,
            any aspect ratio, each side a multiple of `patch_size` up to this. Defaults to `latent_size`.
        patch_size (`int`, defaults to 2):
            Side of the square latent window that becomes one sequence position. An image takes
            `(H // patch_size) * (W // patch_size)` positions between its `<boi>` and `<eoi>` tokens (`num_patches` for
            the default square grid).
        patch_encoder (`str`, defaults to `"linear"`):
            `"linear"`: the timestep embedding is added to every patch before one linear layer, and one linear
            layer maps back (paper, section 3). `"unet"`: U-Net down blocks before the transformer and up blocks
            after it, with skip connections and the timestep fed into every block; plain GroupNorm instead of
            adaptive norms (paper, section 4.3 / Table 6).
        unet_block_out_channels (`list[int]`, *optional*):
            Channels of the U-Net levels, one more than the number of 2x downsamplings (`log2(patch_size)`).
            Defaults to doubling from 64 and capping at 256.
        unet_layers_per_block (`int`, defaults to 1):
            Residual blocks per U-Net level.
        unet_norm_num_groups (`int`, defaults to 8):
            GroupNorm groups of the U-Net blocks (diffusers' `norm_num_groups`); 1 normalises each feature map as a
            whole, the closest to the paper's plain LayerNorm (section 4.3).
        unet_skip_connections (`str`, defaults to `"fine"`):
            Which down-path levels are joined to the up path: `"all"`, `"coarse"` (every level but the
            full-resolution one), `"fine"` (the full-resolution level only) or `"none"`. Coarse skips see the whole
            image, so encoder and decoder learn to denoise around the transformer, without the text, and the model
            never learns to follow the prompt; without any skip the per-pixel noise cannot pass the patch bottleneck.
            The full-resolution skip alone only sees a few pixels: it carries the noise, the transformer the layout
            (see the README's ablation).
        unet_linear_shortcut (`bool`, defaults to `False`):
            With `patch_encoder="unet"`, also add one linear projection of each raw patch (what the linear encoder
            computes) to the U-Net's token. The U-Net's tokens carry layout but lose colour early in training
            (captions naming a wrong colour, samples in mixed colours); the shortcut hands the patch's pixels to the
            transformer directly (see the README's ablation `u_linear_shortcut`). Not in the paper.
        unet_output_shortcut (`bool`, defaults to `False`):
            With `patch_encoder="unet"`, also add one linear projection of each token's hidden state back to its
            patch (what the linear decoder computes, zero at initialisation) to the U-Net's output: the transformer
            draws each patch directly and the U-Net's convolutions, which see across patch borders, add what it
            cannot. Not in the paper.
        image_attention (`str`, defaults to `"bidirectional"`):
            `"bidirectional"`: the patches of one image attend to each other (paper, section 3.2). `"causal"`: plain
            causal attention everywhere, the paper's ablation (Table 5).
        patch_position_embedding (`bool`, defaults to `True`):
            Add a learned embedding of each patch's 2D grid position to its input. The paper only uses the
            backbone's 1D RoPE; the 2D embedding makes spatial layout much easier to learn for small models.
        patch_position_embedding_type (`str`, defaults to `"learned"`):
            How a patch's (row, column) becomes that embedding, for grids of any shape (`image_layers.
            TransfusionPatchPositionEmbedding`): `"learned"`: one vector per cell of the largest grid, the top-left
            cells for a smaller grid; `"factorized"`: a row vector plus a column vector; `"interpolated"`: the default
            grid's vectors, bilinearly resized to the image's grid (as ViTs do at a new resolution).
        modality_experts (`bool`, defaults to `False`):
            Give image positions their own copy of every decoder layer's per-position weights (q, k, v, o
            projections, MLP, norms) and of the final norm, initialised from the text weights; text positions keep the
            original ones and both share one attention over the whole sequence (LMFusion, Shi et al., 2024; BAGEL's
            mixture-of-transformers). With the text weights frozen, a pretrained LLM keeps its text skill exactly
            (`transfusion_hf.modality_experts`).
        boi_token_id, eoi_token_id, image_token_id (`int`):
            Begin-of-image, end-of-image and the image placeholder repeated once per patch.
        prediction_type (`str`, defaults to `"epsilon"`):
            What the image head predicts, with diffusers' names: `"epsilon"` (paper), `"v_prediction"` or
            `"flow_prediction"` (rectified flow, target `noise - x0`).
        diffusion_loss_weight (`float`, defaults to 5.0):
            The paper's lambda in `loss = lm_loss + lambda * diffusion_loss`.
        num_train_timesteps (`int`, defaults to 1000):
            Timestep range the model is conditioned on (flow matching times are `sigma * num_train_timesteps`).
        timestep_embedding_dim (`int`, defaults to 256):
            Width of the sinusoidal timestep features before the timestep MLP.

    Which defaults draw: the class defaults are the paper's architecture as written (epsilon prediction, linear
    2x2 patches; section 3), and they stay so because `save_pretrained` writes only the fields that differ from them:
    changing one would change every checkpoint saved before. At the scale of a CPU or a small GPU run that
    architecture ignores the prompt. The recipe that draws what the prompt says is the package's default recipe,
    `TransfusionConfig.from_recipe("small")` (U-Net 8x8 patch layers with both linear shortcuts, rectified flow), with
    its training hyper-parameters in `transfusion_hf.recipes.load_recipe("small").training` (learning rate 2e-3,
    logit-normal times); `examples/train_transfusion.py` trains it by default.

    Example:

    ```python
    >>> from transfusion_hf import TransfusionConfig, TransfusionForMixedModal
    >>> config = TransfusionConfig.from_recipe("small", vocab_size=512)  # the recipe that draws
    >>> config.patch_encoder, config.prediction_type
    ('unet', 'flow_prediction')
    >>> config = TransfusionConfig(text_config={"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32,
    ...     "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
    ...     boi_token_id=61, eoi_token_id=62, image_token_id=63, latent_size=4)
    >>> model = TransfusionForMixedModal(config)
    ```
    """

    model_type = "transfusion"
    sub_configs_defaults: ClassVar[dict[str, SubConfigSpec]] = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    text_config: dict | PreTrainedConfig | None = None
    latent_channels: int = 4
    latent_size: int = 8
    max_latent_size: int | None = None
    patch_size: int = 2
    patch_encoder: str = "linear"
    unet_block_out_channels: list[int] | None = None
    unet_layers_per_block: int = 1
    unet_norm_num_groups: int = 8
    unet_skip_connections: str = "fine"
    unet_linear_shortcut: bool = False
    unet_output_shortcut: bool = False
    image_attention: str = "bidirectional"
    patch_position_embedding: bool = True
    patch_position_embedding_type: str = "learned"
    modality_experts: bool = False
    boi_token_id: int | None = None
    eoi_token_id: int | None = None
    image_token_id: int | None = None
    prediction_type: str = "epsilon"
    diffusion_loss_weight: float = 5.0
    num_train_timesteps: int = 1000
    timestep_embedding_dim: int = 256
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        vocab_size = self.text_config.vocab_size
        # Default the special tokens to the last three rows of the vocabulary, so a bare config is usable.
        if self.image_token_id is None:
            self.image_token_id = vocab_size - 1
        if self.eoi_token_id is None:
            self.eoi_token_id = vocab_size - 2
        if self.boi_token_id is None:
            self.boi_token_id = vocab_size - 3
        # `isinstance` first: a non-integer `patch_size` must reach the ValueError of
        # `check_transfusion_fields`, not fail here on `.bit_length()` with an AttributeError.
        if (
            self.unet_block_out_channels is None
            and self.patch_encoder == "unet"
            and isinstance(self.patch_size, int)
            and self.patch_size >= 1
        ):
            levels = max(self.patch_size.bit_length() - 1, 0) + 1
            self.unet_block_out_channels = [min(64 * 2**level, 256) for level in range(levels)]
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        self.check_transfusion_fields()

    def check_transfusion_fields(self) -> None:
        """Raise `ValueError` naming the field and the value for every inconsistent image/diffusion field."""
        for name in ("latent_channels", "latent_size", "patch_size", "num_train_timesteps", "timestep_embedding_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.latent_size % self.patch_size != 0:
            raise ValueError(
                f"`patch_size`={self.patch_size} must divide `latent_size`={self.latent_size} "
                "(an image is a whole number of patches)."
            )
        max_size = self.max_latent_size
        if max_size is not None and (
            not isinstance(max_size, int) or max_size < self.latent_size or max_size % self.patch_size
        ):
            raise ValueError(
                f"`max_latent_size` must be None or a multiple of `patch_size`={self.patch_size} of at least "
                f"`latent_size`={self.latent_size}, got {max_size!r}."
            )
        if self.patch_position_embedding_type not in PATCH_POSITION_EMBEDDING_TYPES:
            raise ValueError(
                f"`patch_position_embedding_type` must be one of {PATCH_POSITION_EMBEDDING_TYPES}, got "
                f"{self.patch_position_embedding_type!r}."
            )
        if self.patch_encoder not in PATCH_ENCODERS:
            raise ValueError(f"`patch_encoder` must be one of {PATCH_ENCODERS}, got {self.patch_encoder!r}.")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}.")
        if self.image_attention not in IMAGE_ATTENTIONS:
            raise ValueError(f"`image_attention` must be one of {IMAGE_ATTENTIONS}, got {self.image_attention!r}.")
        if self.unet_skip_connections not in UNET_SKIP_CONNECTIONS:
            raise ValueError(
                f"`unet_skip_connections` must be one of {UNET_SKIP_CONNECTIONS}, got {self.unet_skip_connections!r}."
            )
        if self.patch_encoder == "unet":
            if self.patch_size & (self.patch_size - 1):
                raise ValueError(
                    f"`patch_size`={self.patch_size} must be a power of two with `patch_encoder='unet'` "
                    "(each U-Net level halves the latent side)."
                )
            levels = self.patch_size.bit_length()
            if len(self.unet_block_out_channels) != levels:
                raise ValueError(
                    f"`unet_block_out_channels`={self.unet_block_out_channels} must have log2(patch_size) + 1 = "
                    f"{levels} entries for `patch_size`={self.patch_size}."
                )
            groups = self.unet_norm_num_groups
            if not isinstance(groups, int) or groups <= 0:
                raise ValueError(f"`unet_norm_num_groups` must be a positive integer, got {groups!r}.")
            if any(channels % groups != 0 or channels <= 0 for channels in self.unet_block_out_channels):
                raise ValueError(
                    f"`unet_block_out_channels`={self.unet_block_out_channels} must be positive multiples of "
                    f"`unet_norm_num_groups`={groups} (GroupNorm splits the channels into that many groups)."
                )
        # The two U-Net shortcuts (raw patch -> token, token -> patch) are what the linear encoder / decoder compute.
        for name, linear_layer in (("unet_linear_shortcut", "encoder"), ("unet_output_shortcut", "decoder")):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"`{name}` must be a bool, got {value!r}.")
            if value and self.patch_encoder != "unet":
                raise ValueError(
                    f"`{name}`=True needs `patch_encoder`='unet', got {self.patch_encoder!r} (the linear "
                    f"{linear_layer} is that projection already)."
                )
        if not isinstance(self.modality_experts, bool):
            raise ValueError(f"`modality_experts` must be a bool, got {self.modality_experts!r}.")
        # Check the type first, so a non-number (e.g. None) gets the field's ValueError, not a TypeError.
        if not isinstance(self.diffusion_loss_weight, (int, float)) or self.diffusion_loss_weight < 0:
            raise ValueError(f"`diffusion_loss_weight` must be >= 0, got {self.diffusion_loss_weight!r}.")
        vocab_size = self.text_config.vocab_size
        special = {"boi_token_id": self.boi_token_id, "eoi_token_id": self.eoi_token_id}
        special["image_token_id"] = self.image_token_id
        for name, value in special.items():
            if not isinstance(value, int) or not 0 <= value < vocab_size:
                raise ValueError(
                    f"`{name}`={value!r} is outside the vocabulary of the backbone (vocab_size={vocab_size})."
                )
        if len(set(special.values())) != len(special):
            raise ValueError(f"The special tokens must have distinct ids, got {special}.")

    @classmethod
    def from_recipe(cls, name_or_path: str = "small", vocab_size: int | None = None, **kwargs) -> TransfusionConfig:
        """The model config of a named recipe (`transfusion_hf.recipes`), e.g. the default `"small"` that draws.

        Args:
            name_or_path (`str`): a recipe of `transfusion_hf.recipes.list_recipes()` or a recipe json path.
            vocab_size (`int`, *optional*): the backbone's vocabulary size (your tokenizer's `len(tokenizer)`).
            kwargs: config fields that replace the recipe's (e.g. `latent_channels=4, latent_size=8` for a VAE's
                latents, `boi_token_id=...`).
        """
        # Imported here, inside try/except: this file is copied beside a saved config for `trust_remote_code` loading,
        # where the package (and its recipe files) may not exist, and transformers' import scan of remote code skips
        # try/except blocks; only this method needs the package.
        try:
            from transfusion_hf.recipes import load_recipe
        except ImportError as error:
            raise ImportError("`TransfusionConfig.from_recipe` needs the transfusion_hf package installed.") from error

        fields = dict(load_recipe(name_or_path).model)
        text_config = dict(fields.pop("text_config"))
        if vocab_size is not None:
            text_config["vocab_size"] = vocab_size
        return cls(text_config=text_config, **{**fields, **kwargs})

    @property
    def num_patches(self) -> int:
        """Sequence positions an image of the default (square, `latent_size`) grid takes between `<boi>` and
        `<eoi>`."""
        return (self.latent_size // self.patch_size) ** 2

    @property
    def max_latent_side(self) -> int:
        """The largest latent height or width of an image: `max_latent_size`, or `latent_size` when unset."""
        return self.max_latent_size if self.max_latent_size is not None else self.latent_size

    def check_latent_grid(self, height: int, width: int, name: str = "latents") -> None:
        """Raise a `ValueError` naming `name` and the size unless an image of latent size `height x width` fits the
        model: each side a positive multiple of `patch_size`, at most `max_latent_side`.

        Args:
            height (`int`), width (`int`): the latent grid (pixels in pixel space, VAE latents otherwise).
            name (`str`): what the user passed (`"latents"`, `"height"`, ...), named in the error.
        """
        patch, largest = self.patch_size, self.max_latent_side
        for side in (height, width):
            if not isinstance(side, int) or side <= 0 or side % patch or side > largest:
                raise ValueError(
                    f"`{name}` has a latent grid of {height}x{width}: each side must be a multiple of "
                    f"`patch_size`={patch} and at most `max_latent_size`={largest} (raise `max_latent_size` in the "
                    "config to train larger images)."
                )

    def num_patches_for(self, height: int, width: int) -> int:
        """Sequence positions an image of latent size `height x width` takes (checked by `check_latent_grid`)."""
        self.check_latent_grid(height, width)
        return (height // self.patch_size) * (width // self.patch_size)

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size


# `save_pretrained` copies this file beside config.json and names it in `auto_map`: `AutoConfig.from_pretrained(...,
# trust_remote_code=True)` then loads the config where transfusion_hf is not installed.
TransfusionConfig.register_for_auto_class()

__all__ = ["TransfusionConfig"]
