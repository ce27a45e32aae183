"""Pipelines that bundle an autoencoder, a text encoder and a denoiser: ``load_pipeline("shapes64-text")``."""
from minidiff.pipelines.pipeline import TextToImagePipeline

__all__ = ["TextToImagePipeline"]
