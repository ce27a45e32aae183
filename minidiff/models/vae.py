"""The course's KL autoencoder: images (B, 3, H, W) <-> latents (B, 4, H/f, W/f), f = 4 by default.

A convolutional VAE as in latent diffusion (Rombach et al. 2022, Sec. 3 and App. G, the "KL-f4"
autoencoder): an encoder of residual blocks and stride-2 downsamples maps x to the mean and log-variance
of a diagonal Gaussian posterior q(z | x) (Kingma & Welling 2014, Sec. 2.4); a mirrored decoder maps a
latent z back to an image. The blocks are the U-Net's ``ResBlock`` without a time embedding, with an
optional self-attention block at the lowest resolution.

Notation:

| symbol         | code name         | meaning                                                   |
|----------------|-------------------|-----------------------------------------------------------|
| x              | ``x``             | image (B, C, H, W) in [-1, 1]                             |
| f              | ``factor``        | downsampling factor, 2 ** (len(channel_mults) - 1)        |
| z              | ``z``             | latent (B, latent_channels, H / f, W / f)                 |
| mu, log s^2    | ``mean, logvar``  | the posterior q(z | x) = N(mu, diag(s^2))                 |
| s_z            | ``scaling_factor``| 1 / std of training latents; diffusion runs on s_z * z    |

Image sizes must be multiples of f: ``encode`` refuses others (it does not pad), because a padded
border would be decoded as content. ``scaling_factor`` is a buffer saved with the weights; Stable
Diffusion's 0.18215 is the same quantity for its autoencoder (Rombach et al. 2022, Sec. 4.3.2).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minidiff.models.attention import AttentionBlock
from minidiff.models.layers import Downsample, ResBlock, Upsample
from minidiff.utils import check_tensor, randn

__all__ = ["VAEConfig", "DiagonalGaussian", "AutoencoderKL", "VAE_PRESETS", "latent_std", "set_scaling_factor",
           "reconstruct"]


@dataclass(frozen=True, kw_only=True)
class VAEConfig:
    """Configuration of :class:`AutoencoderKL`; keyword-only. Defaults: the shipped "shapes64-vae"."""

    in_channels: int = 3
    latent_channels: int = 4
    base_channels: int = 16  # level i has base_channels * channel_mults[i] channels
    channel_mults: tuple[int, ...] = (1, 2, 4)  # one entry per resolution level; f = 2 ** (levels - 1)
    num_res_blocks: int = 1  # ResBlocks per level in the encoder (num_res_blocks + 1 in the decoder)
    attention: bool = False  # self-attention at the lowest resolution, in encoder and decoder
    num_groups: int = 8
    num_heads: int = 1

    def __post_init__(self):
        object.__setattr__(self, "channel_mults", tuple(self.channel_mults))
        for name in ("in_channels", "latent_channels", "base_channels", "num_res_blocks", "num_groups", "num_heads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if not self.channel_mults or any(int(m) != m or m < 1 for m in self.channel_mults):
            raise ValueError(f"channel_mults must be a non-empty tuple of positive ints, got {self.channel_mults}")
        widths = [self.base_channels * m for m in self.channel_mults]
        if any(w % self.num_groups for w in widths):
            raise ValueError(f"num_groups must divide every level's channels {widths}, got {self.num_groups}")

    @property
    def factor(self) -> int:
        """Downsampling factor f: H / f and W / f are the latent's spatial size."""
        return 2 ** (len(self.channel_mults) - 1)


VAE_PRESETS = {
    "f4": VAEConfig(),  # 64x64x3 <-> 16x16x4 and 32x32x3 <-> 8x8x4; 648,283 parameters
    "f4-attn": VAEConfig(attention=True),  # + self-attention at 16x16 in encoder and decoder
    "f4-wide": VAEConfig(base_channels=32, channel_mults=(1, 2, 2)),  # for a GPU
    "f8": VAEConfig(channel_mults=(1, 2, 4, 4)),  # 8x smaller per side, as Stable Diffusion's
}


class DiagonalGaussian:
    """q(z | x) = N(mean, diag(exp(logvar))); Kingma & Welling 2014, Sec. 2.4 (CompVis' DiagonalGaussianDistribution)."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)  # as CompVis: keeps exp() finite
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps, eps ~ N(0, I): the reparameterization trick (Kingma & Welling 2014, Eq. 10)."""
        return self.mean + self.std * randn(self.mean.shape, generator=generator, device=self.mean.device,
                                            dtype=self.mean.dtype)

    def mode(self) -> torch.Tensor:
        """The most likely latent, the mean."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q(z | x) || N(0, I)) per image (B,), summed over latent elements (Kingma & Welling 2014, App. B):
        0.5 * sum(mean^2 + var - 1 - logvar)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).flatten(1).sum(dim=1)


class AutoencoderKL(nn.Module):
    """Convolutional KL autoencoder (Rombach et al. 2022, App. G): ``encode(x) -> DiagonalGaussian``, ``decode(z)``."""

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = c = config if config is not None else VAEConfig()
        widths = [c.base_channels * m for m in c.channel_mults]
        self.encoder = nn.Sequential(nn.Conv2d(c.in_channels, widths[0], 3, padding=1),
                                     *self._path(widths, c.num_res_blocks, down=True),
                                     *self._middle(widths[-1]),
                                     nn.GroupNorm(c.num_groups, widths[-1]), nn.SiLU(),
                                     nn.Conv2d(widths[-1], 2 * c.latent_channels, 3, padding=1))
        self.decoder = nn.Sequential(nn.Conv2d(c.latent_channels, widths[-1], 3, padding=1),
                                     *self._middle(widths[-1]),
                                     *self._path(widths[::-1], c.num_res_blocks + 1, down=False),
                                     nn.GroupNorm(c.num_groups, widths[0]), nn.SiLU(),
                                     nn.Conv2d(widths[0], c.in_channels, 3, padding=1))
        self.register_buffer("scaling_factor", torch.tensor(1.0))

    def _res(self, cin: int, cout: int) -> ResBlock:
        return ResBlock(cin, cout, emb_dim=None, num_groups=self.config.num_groups)

    def _middle(self, ch: int) -> list[nn.Module]:
        """ResBlock, optional self-attention, ResBlock at the lowest resolution."""
        c = self.config
        attn = [AttentionBlock(ch, num_heads=c.num_heads, num_groups=c.num_groups)] if c.attention else []
        return [self._res(ch, ch), *attn, self._res(ch, ch)]

    def _path(self, widths: list[int], n_blocks: int, *, down: bool) -> list[nn.Module]:
        """Per level ``n_blocks`` ResBlocks, then a Downsample (encoder) or Upsample (decoder) between levels."""
        layers, ch = [], widths[0]
        for level, width in enumerate(widths):
            for _ in range(n_blocks):
                layers.append(self._res(ch, width))
                ch = width
            if level < len(widths) - 1:
                layers.append(Downsample(ch) if down else Upsample(ch))
        return layers

    @property
    def factor(self) -> int:
        """Downsampling factor f (4 for the default config)."""
        return self.config.factor

    def latent_shape(self, image_shape) -> tuple[int, int, int]:
        """(latent_channels, H / f, W / f) for an image shape (C, H, W)."""
        _, H, W = image_shape
        return (self.config.latent_channels, H // self.factor, W // self.factor)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """The posterior q(z | x) of images x (B, C, H, W) in [-1, 1], H and W multiples of f."""
        x = check_tensor("x", x, ndim=4, channels=self.config.in_channels)
        f = self.factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"x must have height and width divisible by the downsampling factor {f}, got "
                             f"{tuple(x.shape[-2:])}; crop or pad the images first (encode does not pad)")
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (B, C, f h, f w) from latents z (B, latent_channels, h, w) (unscaled, as ``encode`` gives them)."""
        z = check_tensor("z", z, ndim=4, channels=self.config.latent_channels)
        return self.decoder(z)

    def forward(self, x: torch.Tensor, *, generator: torch.Generator | None = None,
                sample_posterior: bool = True) -> tuple[torch.Tensor, DiagonalGaussian]:
        """(reconstruction, posterior): decode a sample of q(z | x) (or its mode)."""
        posterior = self.encode(x)
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    @torch.no_grad()
    def encode_latents(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents s_z * z for diffusion: z sampled with ``generator`` if given, else the posterior mean."""
        posterior = self.encode(x)
        z = posterior.sample(generator=generator) if generator is not None else posterior.mode()
        return z * self.scaling_factor

    @torch.no_grad()
    def decode_latents(self, z_scaled: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (clamped) from scaled latents: decode(z_scaled / s_z)."""
        return self.decode(z_scaled / self.scaling_factor).clamp(-1, 1)


@torch.no_grad()
def latent_std(vae: AutoencoderKL, images: torch.Tensor, *, batch_size: int = 256,
               generator: torch.Generator | None = None) -> float:
    """Std of unscaled posterior samples z over ``images``; 1 / this is the scaling factor (Rombach et al. 2022, Sec. 4.3.2)."""
    zs = [vae.encode(images[k:k + batch_size]).sample(generator=generator) for k in range(0, len(images), batch_size)]
    return float(torch.cat(zs).float().std())


def set_scaling_factor(vae: AutoencoderKL, images: torch.Tensor, **kw) -> float:
    """Set ``vae.scaling_factor`` to 1 / std of its latents on ``images`` (>= 10k images recommended); returns it."""
    s = 1.0 / latent_std(vae, images, **kw)
    vae.scaling_factor.fill_(s)
    return s


def reconstruct(vae: AutoencoderKL, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """decode(mode(encode(x))) clamped to [-1, 1], in batches, without gradients."""
    with torch.no_grad():
        out = [vae.decode(vae.encode(images[k:k + batch_size]).mode()).clamp(-1, 1)
               for k in range(0, len(images), batch_size)]
    return torch.cat(out) if out else images.new_empty(images.shape)

