"""Offset noise in the distiller's forward process (``train.noise_offset``)."""

from __future__ import annotations

import torch

from recaption.training.distiller import training_noise


def _channel_means(noise: torch.Tensor) -> torch.Tensor:
    return noise.mean(dim=(2, 3))


def test_offset_noise_shifts_whole_channels_and_zero_keeps_plain_gaussian_noise() -> None:
    latents = torch.zeros(512, 4, 8, 8)
    torch.manual_seed(0)
    plain = training_noise(latents)
    torch.manual_seed(0)
    zero = training_noise(latents, 0.0)
    assert torch.equal(plain, zero)  # 0 draws nothing more: runs without it stay reproducible
    # Plain noise: a channel's mean over 8x8 pixels has std 1/8; with the offset,
    # sqrt(1/64 + 0.5^2), while the noise within a channel stays unit Gaussian.
    assert abs(float(_channel_means(plain).std()) - 0.125) < 0.02
    offset = training_noise(latents, 0.5)
    assert abs(float(_channel_means(offset).std()) - (1 / 64 + 0.25) ** 0.5) < 0.03
    centred = offset - offset.mean(dim=(2, 3), keepdim=True)
    assert abs(float(centred.std()) - 1.0) < 0.03
    assert offset.shape == latents.shape and offset.dtype == latents.dtype
