"""Tiny diffusion pipelines and broken generators saved once per test session (import the fixtures you use).

Built from configs with seeded random weights (shared/diffusion/tiny.py), so nothing is downloaded. The broken
ones are real models with real defects: NaN in the UNet's output layer, a GAN whose last layer is all zeros.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(scope="session")
def tiny_ddpm_dir(tmp_path_factory) -> str:
    from shared.diffusion.tiny import tiny_ddpm_pipeline

    path = tmp_path_factory.mktemp("tiny-ddpm")
    tiny_ddpm_pipeline().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> str:
    from shared.diffusion.tiny import tiny_sd_pipeline

    path = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def nan_ddpm_dir(tmp_path_factory) -> str:
    """A DDPM whose output layer has a NaN bias: every image it makes is NaN."""
    from shared.diffusion.tiny import tiny_ddpm_pipeline

    pipe = tiny_ddpm_pipeline()
    with torch.no_grad():
        pipe.unet.conv_out.bias[0] = float("nan")
    path = tmp_path_factory.mktemp("nan-ddpm")
    pipe.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def blank_gan_file(tmp_path_factory) -> str:
    """The embedded face GAN with its last layer zeroed: tanh(0) everywhere, i.e. flat grey images."""
    from shared.diffusion.gan import load_dcgan

    net = load_dcgan()
    with torch.no_grad():
        net.main[-2].weight.zero_()
    path = Path(tmp_path_factory.mktemp("blank-gan")) / "netG.pt"
    torch.save({"netG_state_dict": net.state_dict()}, path)
    return str(path)


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
