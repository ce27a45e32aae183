"""Pipelines that bundle an autoencoder, a text encoder and a denoiser (filled by the text-to-image issue)."""
