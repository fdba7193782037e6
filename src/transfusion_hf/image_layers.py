"""Image layers around the backbone: patchify/unpatchify, timestep embedding, linear and U-Net patch encoders.

An encoder maps noisy latents `(num_images, C, H, W)` and their timesteps to `(num_images, num_patches, hidden_size)`
embeddings placed at the image positions of the sequence; a decoder maps the backbone's hidden states at those
positions back to `(num_images, C, H, W)` predictions (paper, section 3 and 4.3).
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import TimestepEmbedding, get_timestep_embedding
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from torch import nn

from .configuration_transfusion import TransfusionConfig


def patchify(latents: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Cut latents into non-overlapping `patch_size` windows in raster order (left to right, top to bottom).

    Args:
        latents (`torch.Tensor` of shape `(num_images, channels, height, width)`).
        patch_size (`int`).

    Returns:
        `torch.Tensor` of shape `(num_images, (height // p) * (width // p), channels * p * p)`.
    """
    num_images, channels, height, width = latents.shape
    p = patch_size
    # (n, C, h, p, w, p) -> (n, h, w, C, p, p): one row per window, rows in raster order.
    patches = latents.reshape(num_images, channels, height // p, p, width // p, p)
    patches = patches.permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(num_images, (height // p) * (width // p), channels * p * p)


def unpatchify(
    patches: torch.Tensor, patch_size: int, channels: int, height: int, width: int | None = None
) -> torch.Tensor:
    """Inverse of [`patchify`].

    Args:
        patches (`torch.Tensor` of shape `(num_images, (height // p) * (width // p), channels * p * p)`).
        patch_size (`int`), channels (`int`): the patch geometry.
        height (`int`), width (`int`, *optional*): the latent size (`width` defaults to `height`: square).

    Returns:
        `torch.Tensor` of shape `(num_images, channels, height, width)`.
    """
    width = height if width is None else width
    num_images, p = patches.shape[0], patch_size
    latents = patches.reshape(num_images, height // p, width // p, channels, p, p)
    latents = latents.permute(0, 3, 1, 4, 2, 5)  # (n, C, h, p, w, p)
    return latents.reshape(num_images, channels, height, width)


def sinusoidal_timestep_features(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps, cosines first, as in DDPM/DiT (diffusers'
    `get_timestep_embedding` with `flip_sin_to_cos=True, downscale_freq_shift=0`).

    Args:
        timesteps (`torch.Tensor` of shape `(num_images,)`): values in `[0, num_train_timesteps]`.
        dim (`int`): feature width (even).

    Returns:
        `torch.Tensor` of shape `(num_images, dim)` in float32.
    """
    return get_timestep_embedding(
        timesteps.float(), dim, flip_sin_to_cos=True, downscale_freq_shift=0, max_period=max_period
    )


class TransfusionTimestepEmbedding(TimestepEmbedding):
    """diffusers' `TimestepEmbedding` (two-layer MLP) fed with [`sinusoidal_timestep_features`].

    Args:
        feature_dim (`int`): width of the sinusoidal features.
        out_dim (`int`): width of the embedding.
    """

    def __init__(self, feature_dim: int, out_dim: int):
        super().__init__(feature_dim, out_dim)
        self.feature_dim = feature_dim

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        features = sinusoidal_timestep_features(timesteps, self.feature_dim).to(self.linear_1.weight.dtype)
        return super().forward(features)


def mark_zero_init(module: nn.Module) -> nn.Module:
    """Flag a leaf layer to be zero-initialised by `_init_weights` (DiT: output layers start at zero)."""
    module._transfusion_zero_init = True
    return module


class TransfusionLinearPatchEncoder(nn.Module):
    """Linear patch encoder: the timestep embedding is added to every patch vector before one linear layer
    (paper, section 3, footnote on the linear encoder)."""

    def __init__(self, config: TransfusionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        patch_dim = config.latent_channels * config.patch_size**2
        self.timestep_embedding = TransfusionTimestepEmbedding(config.timestep_embedding_dim, patch_dim)
        self.proj = nn.Linear(patch_dim, config.hidden_size)

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, None]:
        """
        Args:
            latents (`torch.Tensor` of shape `(num_images, C, H, W)`), timesteps (`(num_images,)`).

        Returns:
            Embeddings of shape `(num_images, num_patches, hidden_size)` and no skip features.
        """
        patches = patchify(latents.to(self.proj.weight.dtype), self.patch_size)
        patches = patches + self.timestep_embedding(timesteps)[:, None, :]
        return self.proj(patches), None


class TransfusionLinearPatchDecoder(nn.Module):
    """Linear patch decoder: one linear layer from hidden states back to patch vectors."""

    def __init__(self, config: TransfusionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.latent_channels = config.latent_channels
        self.latent_size = config.latent_size
        self.proj = mark_zero_init(nn.Linear(config.hidden_size, config.latent_channels * config.patch_size**2))

    def forward(
        self,
        hidden_states: torch.Tensor,
        timesteps: torch.Tensor,
        skips: None = None,
        grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(num_images, num_patches, hidden_size)`).
            grid (`tuple[int, int]`, *optional*): the patch grid `(H // p, W // p)` of the images (default: the
                config's square `latent_size`).

        Returns:
            `torch.Tensor` of shape `(num_images, C, H, W)`.
        """
        rows, columns = grid if grid is not None else (self.latent_size // self.patch_size,) * 2
        patches = self.proj(hidden_states)
        return unpatchify(
            patches, self.patch_size, self.latent_channels, rows * self.patch_size, columns * self.patch_size
        )


def mark_default_init(module: nn.Module) -> nn.Module:
    """Flag every conv and linear layer under `module` to keep PyTorch's fan-in initialisation, the one diffusers'
    blocks are built and trained with. transformers' generic `_init_weights` would draw them from N(0, 0.02) whatever
    their fan-in, and a stack of such convs shrinks the signal level by level until the transformer sees only the
    position embedding (std 0.06 -> 2.5e-5 over four levels)."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)) and not getattr(layer, "_transfusion_zero_init", False):
            layer._transfusion_default_init = True
    return module


def _resnet_block(in_channels: int, out_channels: int, temb_channels: int, groups: int) -> ResnetBlock2D:
    # Plain GroupNorm with the timestep added between the convs ("default" time embedding norm): the paper replaces
    # the U-Net's adaptive norms by plain ones (section 4.3). The config checks that `groups` divides the channels.
    return ResnetBlock2D(
        in_channels=in_channels, out_channels=out_channels, temb_channels=temb_channels, groups=groups, eps=1e-6
    )


class TransfusionUNetPatchEncoder(nn.Module):
    """U-Net down path from diffusers' blocks: `log2(patch_size)` stride-2 stages take the latent to the patch grid,
    then a 1x1 conv to the transformer width. The output of every level is kept as a skip for the up path."""

    def __init__(self, config: TransfusionConfig):
        super().__init__()
        channels = config.unet_block_out_channels
        temb_channels = 4 * channels[0]
        self.timestep_embedding = TransfusionTimestepEmbedding(config.timestep_embedding_dim, temb_channels)
        self.conv_in = nn.Conv2d(config.latent_channels, channels[0], 3, padding=1)
        self.levels = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        in_channels = channels[0]
        for level, out_channels in enumerate(channels):
            blocks = []
            for _ in range(config.unet_layers_per_block):
                blocks.append(_resnet_block(in_channels, out_channels, temb_channels, config.unet_norm_num_groups))
                in_channels = out_channels
            self.levels.append(nn.ModuleList(blocks))
            is_last = level == len(channels) - 1
            self.downsamplers.append(
                nn.Identity() if is_last else Downsample2D(out_channels, use_conv=True, name="op")
            )
        self.norm_out = nn.GroupNorm(config.unet_norm_num_groups, channels[-1], eps=1e-6)
        self.act = nn.SiLU()
        self.proj = nn.Conv2d(channels[-1], config.hidden_size, 1)
        self.patch_size = config.patch_size
        mark_default_init(self)
        # The raw patch, projected as the linear encoder does (and initialised as its projection is, so created after
        # the U-Net's layers are flagged): colour reaches the transformer directly. Measured: the U-Net alone names
        # the wrong colour in 93% of its captions after 700 shapes steps, with the shortcut in none.
        self.shortcut = (
            nn.Linear(config.latent_channels * config.patch_size**2, config.hidden_size)
            if config.unet_linear_shortcut
            else None
        )

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """
        Args:
            latents (`torch.Tensor` of shape `(num_images, C, H, W)`), timesteps (`(num_images,)`).

        Returns:
            Embeddings `(num_images, num_patches, hidden_size)` and the skips: one `(num_images, c_l, H_l, W_l)` map
            per level, finest first.
        """
        temb = self.timestep_embedding(timesteps)
        x = self.conv_in(latents.to(self.conv_in.weight.dtype))
        skips = []
        for blocks, downsample in zip(self.levels, self.downsamplers):
            for block in blocks:
                x = block(x, temb)
            skips.append(x)
            x = downsample(x)
        x = self.proj(self.act(self.norm_out(x)))  # (n, hidden, H/p, W/p)
        tokens = x.flatten(2).transpose(1, 2)  # raster order, (n, N, hidden)
        if self.shortcut is not None:
            tokens = tokens + self.shortcut(patchify(latents.to(self.shortcut.weight.dtype), self.patch_size))
        return tokens, skips


class TransfusionUNetPatchDecoder(nn.Module):
    """U-Net up path from diffusers' blocks: from the transformer's hidden states on the patch grid back to the
    latent, the timestep fed into every block. The down path's skips are concatenated at the levels selected by
    `config.unet_skip_connections`: coarse skips let encoder and decoder denoise the whole image around the
    transformer, without the text, so by default only the full-resolution level is joined (it carries the per-pixel
    noise that the patch tokens cannot). With `config.unet_output_shortcut` the linear decoder's projection of each
    token to its patch is added to the output."""

    def __init__(self, config: TransfusionConfig):
        super().__init__()
        channels = config.unet_block_out_channels
        temb_channels = 4 * channels[0]
        self.default_grid = (config.latent_size // config.patch_size,) * 2
        self.skip_levels = unet_skip_levels(config)
        self.timestep_embedding = TransfusionTimestepEmbedding(config.timestep_embedding_dim, temb_channels)
        self.proj = nn.Conv2d(config.hidden_size, channels[-1], 1)
        self.levels = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        in_channels = channels[-1]
        for level in reversed(range(len(channels))):
            out_channels = channels[level]
            skip_channels = channels[level] if level in self.skip_levels else 0
            blocks = [
                _resnet_block(in_channels + skip_channels, out_channels, temb_channels, config.unet_norm_num_groups)
            ]
            for _ in range(config.unet_layers_per_block - 1):
                blocks.append(_resnet_block(out_channels, out_channels, temb_channels, config.unet_norm_num_groups))
            self.levels.append(nn.ModuleList(blocks))
            self.upsamplers.append(Upsample2D(out_channels, use_conv=True) if level > 0 else nn.Identity())
            in_channels = out_channels
        self.norm_out = nn.GroupNorm(config.unet_norm_num_groups, channels[0], eps=1e-6)
        self.act = nn.SiLU()
        self.conv_out = mark_zero_init(nn.Conv2d(channels[0], config.latent_channels, 3, padding=1))
        mark_default_init(self)
        # The linear decoder's projection, created after the U-Net's layers are flagged so that it starts at zero as
        # the linear decoder does (`config.unet_output_shortcut`).
        self.shortcut = TransfusionLinearPatchDecoder(config) if config.unet_output_shortcut else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        timesteps: torch.Tensor,
        skips: list[torch.Tensor],
        grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(num_images, num_patches, hidden_size)`).
            timesteps (`torch.Tensor` of shape `(num_images,)`).
            skips (`list[torch.Tensor]`): the encoder's skips, finest first (only `config.unet_skip_connections`
                levels are used).
            grid (`tuple[int, int]`, *optional*): the patch grid `(H // p, W // p)` of the images (default: the
                config's square `latent_size`).

        Returns:
            `torch.Tensor` of shape `(num_images, C, H, W)`.
        """
        temb = self.timestep_embedding(timesteps)
        num_images = hidden_states.shape[0]
        grid = grid if grid is not None else self.default_grid
        x = hidden_states.transpose(1, 2).reshape(num_images, -1, *grid)
        x = self.proj(x)
        num_levels = len(self.levels)
        for index, (blocks, upsample) in enumerate(zip(self.levels, self.upsamplers)):
            level = num_levels - 1 - index
            if level in self.skip_levels:
                x = torch.cat([x, skips[level].to(x.dtype)], dim=1)
            for block in blocks:
                x = block(x, temb)
            x = upsample(x)
        output = self.conv_out(self.act(self.norm_out(x)))
        if self.shortcut is not None:
            output = output + self.shortcut(hidden_states, timesteps, grid=grid)
        return output


def unet_skip_levels(config: TransfusionConfig) -> frozenset[int]:
    """The U-Net levels (0 = full resolution) whose down-path features are joined to the up path."""
    num_levels = len(config.unet_block_out_channels)
    if config.unet_skip_connections == "all":
        return frozenset(range(num_levels))
    if config.unet_skip_connections == "coarse":
        return frozenset(range(1, num_levels))
    if config.unet_skip_connections == "fine":
        return frozenset({0})
    return frozenset()


class TransfusionPatchPositionEmbedding(nn.Embedding):
    """A learned embedding of each patch's (row, column) for patch grids of any shape (`config.patch_position_embedding
    _type`). No library part fits: transformers' and diffusers' image embeddings are sin-cos tables or 1D learned
    ones for one square grid.

    - `"learned"`: one row of `weight` per cell of the largest grid (`max_latent_side // patch_size` squared), read
      at `row * largest + column`: a smaller grid uses the top-left cells. With `max_latent_size` unset this is the
      former square table, row for row, so saved models load unchanged.
    - `"factorized"`: `largest` row vectors then `largest` column vectors; a cell gets its row's plus its column's.
    - `"interpolated"`: the default grid's table (`latent_size // patch_size` squared), bilinearly resized to the
      image's grid, as ViTs (timm, DINOv2) do at a new resolution; the default grid reads it unchanged.

    An `nn.Embedding`, so transformers' init pass draws it as before.
    """

    def __init__(self, config: TransfusionConfig):
        self.kind = config.patch_position_embedding_type
        self.largest = config.max_latent_side // config.patch_size
        self.default = config.latent_size // config.patch_size
        rows = {"learned": self.largest**2, "factorized": 2 * self.largest, "interpolated": self.default**2}
        super().__init__(rows[self.kind], config.hidden_size)

    def forward(self, grid: tuple[int, int]) -> torch.Tensor:
        """
        Args:
            grid (`tuple[int, int]`): the patch grid `(rows, columns)` of the images.

        Returns:
            `torch.Tensor` of shape `(rows * columns, hidden_size)`, in raster order.
        """
        rows, columns = grid
        if self.kind == "interpolated":
            table = self.weight.reshape(self.default, self.default, -1)
            if (rows, columns) == (self.default, self.default):
                return self.weight
            table = nn.functional.interpolate(
                table.permute(2, 0, 1)[None], size=(rows, columns), mode="bilinear", align_corners=False
            )
            return table[0].flatten(1).transpose(0, 1)
        if self.kind == "factorized":
            row_vectors, column_vectors = self.weight[:rows], self.weight[self.largest : self.largest + columns]
            return (row_vectors[:, None, :] + column_vectors[None, :, :]).reshape(rows * columns, -1)
        if (rows, columns) == (self.largest, self.largest):
            return self.weight
        return self.weight.reshape(self.largest, self.largest, -1)[:rows, :columns].reshape(rows * columns, -1)


def build_patch_layers(config: TransfusionConfig) -> tuple[nn.Module, nn.Module]:
    """The (encoder, decoder) pair selected by `config.patch_encoder`."""
    if config.patch_encoder == "unet":
        return TransfusionUNetPatchEncoder(config), TransfusionUNetPatchDecoder(config)
    return TransfusionLinearPatchEncoder(config), TransfusionLinearPatchDecoder(config)


__all__ = [
    "patchify",
    "unpatchify",
    "sinusoidal_timestep_features",
    "TransfusionTimestepEmbedding",
    "TransfusionLinearPatchEncoder",
    "TransfusionLinearPatchDecoder",
    "TransfusionUNetPatchEncoder",
    "TransfusionUNetPatchDecoder",
    "TransfusionPatchPositionEmbedding",
    "build_patch_layers",
    "mark_default_init",
    "unet_skip_levels",
]
