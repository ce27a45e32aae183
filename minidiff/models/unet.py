"""The minidiff U-Net: ``net(x, t, *, class_labels=None, context=None, context_mask=None) -> tensor like x``.

Architecture of the DDPM U-Net (Ho et al. 2020, App. B): a sinusoidal time embedding and MLP; per
resolution level ``num_res_blocks`` residual blocks (self-attention after each at ``attn_levels``)
then a stride-2 downsample; a middle of ResBlock-Attention-ResBlock; an upsampling path with
``num_res_blocks + 1`` blocks per level fed by skip connections; GroupNorm-SiLU and a
zero-initialised output convolution, so an untrained net predicts 0. Extras: a class embedding
with a learned null class (Ho & Salimans 2022, classifier-free guidance) and cross-attention to a
context sequence (Rombach et al. 2022, Eq. 3). Inputs whose size is not a multiple of
``2 ** (levels - 1)`` are padded internally and cropped back.

Presets (parameter counts measured with ``sum(p.numel() for p in unet_from_preset(name).parameters())``):

| name     | for                               | in/out | base | mults        | res | attn at    | params     |
|----------|-----------------------------------|--------|------|--------------|-----|------------|------------|
| "tiny"   | MNIST family on 2 CPU cores       | 1/1    | 32   | (1, 1, 2)    | 1   | 7x7        |   810,817  |
| "small"  | MNIST family on a GPU             | 1/1    | 64   | (1, 2, 2)    | 2   | 14x14, 7x7 | 6,801,409  |
| "cifar"  | CIFAR-10 (32x32 RGB) on one GPU   | 3/3    | 128  | (1, 2, 2, 2) | 2   | 16x16      | 35,746,307 |
| "latent" | 4-channel 8x8-32x32 latents, text | 4/4    | 64   | (1, 2, 2)    | 2   | levels 1, 2| 7,534,212  |

"cifar" is the DDPM CIFAR-10 model (Ho et al. 2020: 35.7M). "latent" has cross-attention with
``context_dim=128``. ``num_classes=K`` (any preset) adds ``(K + 1) * 4 * base`` parameters.

Training recipe on CUDA (bf16 autocast + channels_last; the same code runs unchanged on CPU/MPS)::

    net = unet_from_preset("cifar").to("cuda", memory_format=torch.channels_last)
    x_t = x_t.to("cuda", memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.mse_loss(net(x_t, t).float(), target)
    loss.backward()  # parameters and optimizer state stay float32; no GradScaler needed for bf16
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from minidiff.models.attention import AttentionBlock
from minidiff.models.layers import Downsample, ResBlock, Upsample, timestep_embedding
from minidiff.utils import check_tensor

__all__ = ["UNetConfig", "UNet", "PRESETS", "unet_from_preset", "grow_unet", "GROWABLE"]


@dataclass(frozen=True, kw_only=True)
class UNetConfig:
    """Configuration of :class:`UNet` (defaults = the "tiny" preset); keyword-only."""

    in_channels: int = 1
    out_channels: int = 1
    base_channels: int = 32  # level i has base_channels * channel_mults[i] channels
    channel_mults: tuple[int, ...] = (1, 1, 2)  # one entry per resolution level; H, W halve between levels
    num_res_blocks: int = 1  # ResBlocks per level on the way down (num_res_blocks + 1 on the way up)
    attn_levels: tuple[int, ...] = (2,)  # level indices with self-(and cross-)attention after each ResBlock
    mid_attention: bool = True  # attention between the two middle ResBlocks
    dropout: float = 0.0
    num_groups: int = 8  # GroupNorm groups
    num_heads: int = 4
    num_classes: int | None = None  # K classes + a learned null class with id K
    context_dim: int | None = None  # D of a context sequence (B, L, D) for cross-attention
    scale_shift: bool = False  # AdaGN time conditioning (Dhariwal & Nichol 2021) instead of adding
    zero_init: bool = True  # zero the last conv of each ResBlock and each attention output (ADM, EDM; measured)
    attn_pos: bool = False  # a 2-D position code in every attention block (AttentionBlock's ``position``)

    def __post_init__(self):
        object.__setattr__(self, "channel_mults", tuple(self.channel_mults))
        object.__setattr__(self, "attn_levels", tuple(self.attn_levels))
        if not self.channel_mults or any(int(m) != m or m < 1 for m in self.channel_mults):
            raise ValueError(f"channel_mults must be a non-empty tuple of positive ints, got {self.channel_mults}")
        for name in ("in_channels", "out_channels", "base_channels", "num_res_blocks", "num_groups", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        bad = [i for i in self.attn_levels if not 0 <= i < len(self.channel_mults)]
        if bad:
            raise ValueError(f"attn_levels must be level indices in 0..{len(self.channel_mults) - 1}, got {self.attn_levels}")
        for m in self.channel_mults:
            if (self.base_channels * m) % self.num_groups != 0:
                raise ValueError(f"num_groups must divide every level's channels "
                                 f"{[self.base_channels * m for m in self.channel_mults]}, got {self.num_groups}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be None or >= 1, got {self.num_classes}")
        if self.context_dim is not None and self.context_dim < 1:
            raise ValueError(f"context_dim must be None or >= 1, got {self.context_dim}")

    @property
    def emb_dim(self) -> int:
        """Width of the time embedding MLP, 4 * base_channels as in DDPM."""
        return 4 * self.base_channels


class UNet(nn.Module):
    """DDPM-style U-Net (Ho et al. 2020, App. B) with optional class and context conditioning."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        chans = [c.base_channels * m for m in c.channel_mults]
        self.time_mlp = nn.Sequential(nn.Linear(c.base_channels, c.emb_dim), nn.SiLU(), nn.Linear(c.emb_dim, c.emb_dim))
        self.class_emb = nn.Embedding(c.num_classes + 1, c.emb_dim) if c.num_classes is not None else None
        self.conv_in = nn.Conv2d(c.in_channels, chans[0], 3, padding=1)
        self.down, skip_chans = self._build_down(chans)
        mid_attn = [self._attn(chans[-1])] if c.mid_attention else []
        self.mid = nn.ModuleList([self._res(chans[-1], chans[-1]), *mid_attn, self._res(chans[-1], chans[-1])])
        self.up = self._build_up(chans, skip_chans)
        self.norm_out = nn.GroupNorm(c.num_groups, chans[0])
        self.conv_out = nn.Conv2d(chans[0], c.out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        if c.zero_init:
            self._zero_residual_branches()

    def _zero_residual_branches(self) -> None:
        """Start every residual branch at zero, so each block is the identity at init (Dhariwal & Nichol 2021's
        ``zero_module``; Karras et al. 2022 EDM): the last conv of each ResBlock, each attention projection."""
        for m in self.modules():
            if isinstance(m, ResBlock):
                params = [m.conv2.weight, m.conv2.bias]
            elif isinstance(m, AttentionBlock):
                params = [m.proj.weight, m.proj.bias] + ([m.proj_cross.weight, m.proj_cross.bias]
                                                         if m.context_dim is not None else [])
            else:
                continue
            for prm in params:
                nn.init.zeros_(prm)

    def _res(self, cin: int, cout: int) -> ResBlock:
        """A ResBlock configured from self.config."""
        c = self.config
        return ResBlock(cin, cout, emb_dim=c.emb_dim, num_groups=c.num_groups, dropout=c.dropout, scale_shift=c.scale_shift)

    def _attn(self, ch: int) -> AttentionBlock:
        """An AttentionBlock configured from self.config."""
        c = self.config
        return AttentionBlock(ch, num_heads=c.num_heads, num_groups=c.num_groups, context_dim=c.context_dim,
                              position=c.attn_pos)

    def _stage(self, cin: int, cout: int, level: int) -> nn.ModuleList:
        """One ResBlock, followed by an AttentionBlock at attention levels."""
        stage = nn.ModuleList([self._res(cin, cout)])
        if level in self.config.attn_levels:
            stage.append(self._attn(cout))
        return stage

    def _build_down(self, chans: list[int]) -> tuple[nn.ModuleList, list[int]]:
        """Down path as stages [ResBlock, AttentionBlock?] or [Downsample], plus the skip channels."""
        blocks, skip_chans, ch = nn.ModuleList(), [chans[0]], chans[0]
        for level, cout in enumerate(chans):
            for _ in range(self.config.num_res_blocks):
                blocks.append(self._stage(ch, cout, level))
                ch = cout
                skip_chans.append(ch)
            if level < len(chans) - 1:
                blocks.append(nn.ModuleList([Downsample(ch)]))
                skip_chans.append(ch)
        return blocks, skip_chans

    def _build_up(self, chans: list[int], skip_chans: list[int]) -> nn.ModuleList:
        """Up path: num_res_blocks + 1 ResBlocks per level, each eating one skip, then Upsample."""
        blocks, ch, skips = nn.ModuleList(), chans[-1], list(skip_chans)
        for level in reversed(range(len(chans))):
            for _ in range(self.config.num_res_blocks + 1):
                blocks.append(self._stage(ch + skips.pop(), chans[level], level))
                ch = chans[level]
            if level > 0:
                blocks.append(nn.ModuleList([Upsample(ch)]))
        return blocks

    def _embed(self, t: torch.Tensor, class_labels: torch.Tensor | None, batch: int) -> torch.Tensor:
        """SiLU(time MLP(sinusoid(t)) + class embedding), shared by every ResBlock: (B, emb_dim)."""
        c = self.config
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must have shape ({batch},) (one timestep per image), got {tuple(t.shape)}")
        emb = self.time_mlp(timestep_embedding(t, c.base_channels).to(self.conv_in.weight.dtype))
        if c.num_classes is not None:
            if class_labels is None:
                class_labels = torch.full((batch,), c.num_classes, dtype=torch.long, device=t.device)
            emb = emb + self.class_emb(self._check_labels(class_labels, batch))
        elif class_labels is not None:
            raise ValueError("class_labels was given but this UNet has num_classes=None; "
                             "build it with num_classes=K to condition on classes")
        return F.silu(emb)

    def _check_labels(self, class_labels: torch.Tensor, batch: int) -> torch.Tensor:
        """Raise unless class_labels is int64 (batch,) with values in 0..num_classes (num_classes = null)."""
        n = self.config.num_classes
        if not isinstance(class_labels, torch.Tensor):
            raise ValueError(f"class_labels must be an int64 torch.Tensor of shape ({batch},), got "
                             f"{type(class_labels).__name__}; convert with torch.as_tensor(labels, dtype=torch.int64)")
        if class_labels.shape != (batch,) or class_labels.dtype != torch.long:
            raise ValueError(f"class_labels must be int64 of shape ({batch},), got {class_labels.dtype} {tuple(class_labels.shape)}")
        if class_labels.numel() and (int(class_labels.min()) < 0 or int(class_labels.max()) > n):
            raise ValueError(f"class_labels must be in 0..{n} ({n} = null class), "
                             f"got values in {int(class_labels.min())}..{int(class_labels.max())}")
        return class_labels

    def _check_context(self, context: torch.Tensor | None, context_mask: torch.Tensor | None, batch: int) -> None:
        """Raise unless context is (batch, L, context_dim) and context_mask is None or bool (batch, L)."""
        if context is None:
            if context_mask is not None:
                raise ValueError("context_mask was given without context")
            return
        if self.config.context_dim is None:
            raise ValueError("context was given but this UNet has context_dim=None; build it with context_dim=D")
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != self.config.context_dim:
            raise ValueError(f"context must have shape ({batch}, L, {self.config.context_dim}), got {tuple(context.shape)}")
        if context_mask is not None and (context_mask.dtype != torch.bool or context_mask.shape != context.shape[:2]):
            raise ValueError(f"context_mask must be bool of shape {tuple(context.shape[:2])}, "
                             f"got {context_mask.dtype} {tuple(context_mask.shape)}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, *, class_labels: torch.Tensor | None = None,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Predict a tensor like x (B, C, H, W) from x and continuous timesteps t (B,) in [0, T)."""
        check_tensor("x", x, ndim=4, channels=self.config.in_channels)
        B, _, H, W = x.shape
        self._check_context(context, context_mask, B)
        emb = self._embed(torch.as_tensor(t, device=x.device), class_labels, B)
        m = 2 ** (len(self.config.channel_mults) - 1)
        x = F.pad(x, (0, -W % m, 0, -H % m))  # (B, C, H', W') with H', W' multiples of m
        h = self.conv_in(x)
        skips = [h]
        for stage in self.down:
            h = self._run(stage, h, emb, context, context_mask)
            skips.append(h)
        h = self._run(self.mid, h, emb, context, context_mask)
        for stage in self.up:
            if isinstance(stage[0], ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            h = self._run(stage, h, emb, context, context_mask)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return h[:, :, :H, :W]

    @staticmethod
    def _run(blocks: nn.ModuleList, h, emb, context, context_mask) -> torch.Tensor:
        """Apply a list of blocks in order, giving each the inputs it takes."""
        for block in blocks:
            if isinstance(block, ResBlock):
                h = block(h, emb)
            elif isinstance(block, AttentionBlock):
                h = block(h, context, context_mask)
            else:
                h = block(h)
        return h


PRESETS: dict[str, UNetConfig] = {
    "tiny": UNetConfig(in_channels=1, out_channels=1, base_channels=32, channel_mults=(1, 1, 2), num_res_blocks=1,
                       attn_levels=(2,), num_groups=8, num_heads=4),
    "small": UNetConfig(base_channels=64, channel_mults=(1, 2, 2), num_res_blocks=2, attn_levels=(1, 2),
                        num_groups=32, dropout=0.1),
    "cifar": UNetConfig(in_channels=3, out_channels=3, base_channels=128, channel_mults=(1, 2, 2, 2),
                        num_res_blocks=2, attn_levels=(1,), num_groups=32, dropout=0.1),
    "latent": UNetConfig(in_channels=4, out_channels=4, base_channels=64, channel_mults=(1, 2, 2),
                         num_res_blocks=2, attn_levels=(1, 2), num_groups=32, context_dim=128),
}


def unet_from_preset(name: str, **overrides) -> UNet:
    """Build a UNet from a named preset in PRESETS, replacing any UNetConfig field by keyword."""
    if name not in PRESETS:
        raise KeyError(f"unknown UNet preset {name!r}; known presets: {sorted(PRESETS)}")
    return UNet(replace(PRESETS[name], **overrides))


GROWABLE = ("attn_pos", "attn_levels")  # options a trained U-Net can gain: each adds parameters that start out
# computing nothing (attn_levels may only gain levels: each new AttentionBlock starts with zero output projections)


def grow_unet(unet: UNet, **overrides) -> UNet:
    """``unet`` rebuilt with ``overrides`` of its config, every trained weight kept, for fine-tuning. Only the
    GROWABLE options may differ from its config (the others would change what the trained weights mean), and
    ``attn_levels`` may only gain levels; each block gained starts as the identity (its output projections are
    zero, Dhariwal & Nichol 2021's ``zero_module``), so the grown net computes what ``unet`` did. With no change
    it returns ``unet`` itself."""
    if "attn_levels" in overrides:  # a set of levels, in any order
        overrides["attn_levels"] = tuple(sorted(set(overrides["attn_levels"])))
    new = replace(unet.config, **overrides)
    changed = sorted(k for k in asdict(new) if getattr(new, k) != getattr(unet.config, k))
    if not changed:
        return unet
    if not set(changed) <= set(GROWABLE):
        raise ValueError(f"a trained U-Net can gain only {list(GROWABLE)}, got changes to {changed}")
    if not set(unet.config.attn_levels) <= set(new.attn_levels):
        raise ValueError(f"attn_levels can only gain levels: the trained U-Net has {list(unet.config.attn_levels)}, "
                         f"got {list(new.attn_levels)}; it must include those")
    if unet.config.attn_pos and not new.attn_pos:
        raise ValueError("attn_pos can only be switched on: the trained U-Net has attn_pos=True, got False")
    grown = UNet(new)
    old_blocks = {name for name, m in unet.named_modules() if isinstance(m, AttentionBlock)}
    gained = [name for name, m in grown.named_modules() if isinstance(m, AttentionBlock) and name not in old_blocks]
    missing, unexpected = grown.load_state_dict(unet.state_dict(), strict=False)
    lost = [k for k in missing if ".pos_proj." not in k and not any(k.startswith(g + ".") for g in gained)]
    if unexpected or lost:  # a GROWABLE option that moved or dropped trained weights
        raise RuntimeError(f"grow_unet lost weights: missing {lost}, unexpected {unexpected}")
    for name in gained:  # identity at the start whatever zero_init says, as pos_proj is
        block = grown.get_submodule(name)
        for layer in (block.proj, getattr(block, "proj_cross", None)):
            if layer is not None:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
    return grown.to(next(unet.parameters()).device)
