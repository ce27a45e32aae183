"""Networks: the U-Net and its layers, the autoencoder (``vae``), text encoders (``text_encoder``, ``clip``,
``pretrained_text``)."""
from minidiff.models.unet import PRESETS, UNet, UNetConfig, unet_from_preset

__all__ = ["UNet", "UNetConfig", "PRESETS", "unet_from_preset"]
