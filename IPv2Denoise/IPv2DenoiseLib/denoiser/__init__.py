"""Inference: network architectures, weights and model cards, HU normalization, the volume denoiser.

Never imports training, synthetic or purification code."""
