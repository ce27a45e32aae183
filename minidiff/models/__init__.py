"""Networks: the U-Net and its layers (later: the autoencoder, text encoders, adapters)."""
from minidiff.models.unet import PRESETS, UNet, UNetConfig, unet_from_preset

__all__ = ["UNet", "UNetConfig", "PRESETS", "unet_from_preset"]
