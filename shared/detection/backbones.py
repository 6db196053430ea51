"""Detector networks: (B, 3, H, W) normalised images -> (B, 2) logits (index 0 real, 1 fake); the score is
softmax(logits)[:, 1].

A detector is described by a :class:`DetectorSpec` (saved beside its weights as ``detector.json``), so a saved
detector is rebuilt offline without its original reference:

    {"format": 1, "kind": "small-cnn" | "resnet" | "convnext" | "vit" | "clip-probe" | "pretrained-probe",
     "input_size": 32, "mean": [...], "std": [...], "width": 32, "norm": "batch", "dropout": 0.1,
     "hf_config": {...} | null, "reference": str | null, "head": "linear", "hidden": 256,
     "training": {"split": ..., "groups": [...], "sources": [...], "boosting": ...} | null}

A ``pretrained-probe`` is a head on a frozen backbone of :mod:`shared.detection.features`: its input size and
normalisation are the backbone's own (its preprocessing config), and its weights file holds the head only; the
frozen tower is rebuilt from ``reference`` (offline for the embedded ``efficientnet-lite0``) whenever the detector is
built or loaded.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.config import StorageConfig
from shared.detection.augment import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from shared.errors import ModelError
from shared.stage import resolve_output
from shared.storage import Storage

SPEC_FILE = "detector.json"
WEIGHTS_FILE = "model.safetensors"
HF_KINDS = ("resnet", "convnext", "vit")

# Small from-scratch defaults, fit for CPUs and small images; 'config' keys override them.
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "resnet": {"embedding_size": 16, "hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1], "layer_type": "basic"},
    "convnext": {"hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1]},
    "vit": {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 128,
            "patch_size": 4},
    "clip-probe": {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 128,
                   "patch_size": 4, "projection_dim": 64},
}


SPEC_FORMAT = 1


@dataclass(frozen=True)
class TrainedOn:
    """What a detector was trained on (train-detector writes it): evaluate-detector refuses to test it on images it
    saw, and takes its split when none is configured."""

    split: dict[str, Any]
    """The SplitConfig fields the mixture was split with."""
    groups: list[str]
    """The difficulty groups (dataset/source/label) of the mixture."""
    sources: list[dict[str, Any]]
    """The SourceConfig fields of every dataset in the mixture (uri, include, exclude, labels)."""
    boosting: str


@dataclass(frozen=True)
class DetectorSpec:
    """Everything needed to rebuild a detector's network and feed it: its kind and sizes, its input normalisation,
    the transformers config of HF backbones, and what it was trained on."""

    kind: str
    """small-cnn, resnet, convnext, vit, clip-probe or pretrained-probe."""
    input_size: int
    """Images are resized to input_size x input_size before normalisation."""
    mean: tuple[float, ...]
    std: tuple[float, ...]
    width: int = 32
    """small-cnn: channels of the first block."""
    norm: str = "batch"
    """small-cnn: batch or group normalisation."""
    dropout: float = 0.1
    hf_config: dict[str, Any] | None = None
    """HF backbones: the transformers config as a dict (two labels)."""
    reference: str | None = None
    """Where pretrained weights come from (a hub id, local path or s3://), if any."""
    head: str = "linear"
    """pretrained-probe: linear or mlp (one hidden ReLU layer)."""
    hidden: int = 256
    """pretrained-probe: width of the mlp head's hidden layer."""
    training: TrainedOn | None = None

    def to_json(self) -> dict[str, Any]:
        return {"format": SPEC_FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> DetectorSpec:
        """The spec a detector.json holds; a ModelError naming ``where`` for another format or unknown fields."""
        if data.get("format") != SPEC_FORMAT:
            raise ModelError(f"detector {where}: unknown {SPEC_FILE} format {data.get('format')!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"format"})
        if unknown:
            raise ModelError(f"detector {where}: unknown {SPEC_FILE} field(s) {', '.join(unknown)}")
        values = {k: v for k, v in data.items() if k in known}
        values.update({k: tuple(values[k]) for k in ("mean", "std") if k in values})
        if values.get("training") is not None:
            values["training"] = TrainedOn(**values["training"])
        try:
            return cls(**values)
        except TypeError as exc:
            raise ModelError(f"detector {where}: {SPEC_FILE} is incomplete ({exc})") from None


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(min(8, channels // 2) or 1, channels)
    return nn.BatchNorm2d(channels)


class SmallCNN(nn.Module):
    """Three conv blocks (conv-norm-ReLU x2, max-pool), global average pooling, a linear head.

    ``norm``: BatchNorm (trains fastest here; its running statistics need a few dozen steps before evaluation-mode
    scores mean anything) or GroupNorm (the same computation in training and evaluation, any batch size).
    """

    def __init__(self, width: int = 32, dropout: float = 0.1, norm: str = "batch"):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i in range(3):
            c_out = width * 2**i
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), _norm(norm, c_out), nn.ReLU(inplace=True),
                       nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), _norm(norm, c_out), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_in, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 2)
        h = self.features(x)  # (B, 4*width, H/8, W/8)
        return self.head(h.mean(dim=(2, 3), keepdim=True))


class HFClassifier(nn.Module):
    """A transformers ...ForImageClassification with two labels; returns plain logits."""

    def __init__(self, net: nn.Module, native_size: int | None):
        super().__init__()
        self.net = net
        self.native_size = native_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native_size and x.shape[-1] != self.native_size:
            x = nn.functional.interpolate(x, size=(self.native_size, self.native_size), mode="bilinear",
                                          align_corners=False)
        return self.net(pixel_values=x).logits


class ClipProbe(nn.Module):
    """A linear probe on a frozen CLIP vision tower's projected image embedding (UnivFD, Ojha et al. 2023)."""

    def __init__(self, tower: nn.Module, native_size: int, dropout: float):
        super().__init__()
        self.tower = tower
        for p in self.tower.parameters():
            p.requires_grad_(False)
        self.tower.eval()
        self.native_size = native_size
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(tower.config.projection_dim, 2))

    def train(self, mode: bool = True) -> ClipProbe:
        super().train(mode)
        self.tower.eval()  # frozen, always in inference mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.native_size:
            x = nn.functional.interpolate(x, size=(self.native_size, self.native_size), mode="bilinear",
                                          align_corners=False)
        with torch.no_grad():
            emb = self.tower(pixel_values=x).image_embeds  # (B, projection_dim)
        return self.head(emb)


class PretrainedProbe(nn.Module):
    """A linear or one-hidden-layer MLP head on a frozen pretrained backbone's pooled features (UnivFD-style).

    The tower stays out of the state dict (checkpoints and saved detectors hold the head only): whoever builds the
    probe loads the tower from its reference, and a strict ``load_state_dict`` does not ask for the tower's keys.
    """

    def __init__(self, tower: nn.Module, dim: int, native_size: int, head: str, hidden: int, dropout: float):
        super().__init__()
        self.tower = tower
        for p in self.tower.parameters():
            p.requires_grad_(False)
        self.tower.eval()
        self.native_size = native_size
        if head == "linear":
            self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, 2))
        elif head == "mlp":
            self.head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                      nn.Linear(hidden, 2))
        else:
            raise ModelError(f"pretrained-probe head {head!r}: use linear or mlp")
        self._tower_keys = tuple(f"tower.{k}" for k in self.tower.state_dict())
        self.register_state_dict_post_hook(_drop_tower)
        self.register_load_state_dict_post_hook(_tower_not_missing)

    def train(self, mode: bool = True) -> PretrainedProbe:
        super().train(mode)
        self.tower.eval()  # frozen, always in inference mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.native_size:
            x = nn.functional.interpolate(x, size=(self.native_size, self.native_size), mode="bilinear",
                                          align_corners=False)
        with torch.no_grad():
            features = self.tower.pooled(x)  # (B, dim)
        return self.head(features)


def _drop_tower(module: PretrainedProbe, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    for key in module._tower_keys:
        state.pop(prefix + key, None)


def _tower_not_missing(module: PretrainedProbe, incompatible: Any) -> None:
    tower = set(module._tower_keys)
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys
                                    if not any(k == t or k.endswith("." + t) for t in tower)]


def _build_probe(spec: DetectorSpec, storage: StorageConfig | None) -> PretrainedProbe:
    from shared.detection.features import describe_backbone, load_tower

    if not spec.reference:
        raise ModelError("pretrained-probe detector: its spec names no backbone reference")
    card = describe_backbone(spec.reference, storage)
    return PretrainedProbe(load_tower(card, spec.reference), card.dim, card.preprocess.size, spec.head, spec.hidden,
                           spec.dropout)


def _hf_classes(kind: str):
    import transformers as tf

    return {
        "resnet": (tf.ResNetConfig, tf.ResNetForImageClassification),
        "convnext": (tf.ConvNextConfig, tf.ConvNextForImageClassification),
        "vit": (tf.ViTConfig, tf.ViTForImageClassification),
        "clip-probe": (tf.CLIPVisionConfig, tf.CLIPVisionModelWithProjection),
    }[kind]


def make_spec(model: Any, input_size: int, storage: StorageConfig | None = None) -> DetectorSpec:
    """The spec of a new detector from a BackboneConfig; a reference is resolved here (its config is read).

    pretrained-probe: input_size, mean and std are the backbone's own (its preprocessing config), whatever
    ``input_size`` says; clip-probe: mean and std from the reference's preprocessor_config.json where it has one."""
    clip = model.kind == "clip-probe"
    spec = DetectorSpec(kind=model.kind, input_size=int(input_size), width=model.width, norm=model.norm,
                        dropout=model.dropout, reference=model.reference, head=model.head, hidden=model.hidden,
                        mean=tuple(CLIP_MEAN if clip else IMAGENET_MEAN), std=tuple(CLIP_STD if clip else IMAGENET_STD))
    if model.kind == "small-cnn":
        return spec
    if model.kind == "pretrained-probe":
        from shared.detection.features import describe_backbone

        backbone = describe_backbone(model.reference, storage).preprocess
        return replace(spec, input_size=backbone.size, mean=backbone.mean, std=backbone.std)
    config_cls, _ = _hf_classes(model.kind)
    if model.reference:
        from shared.detection.features import read_preprocess
        from shared.models import resolve_model

        where = resolve_model(model.reference, storage)
        if clip and Path(where).is_dir():
            processor = read_preprocess(where, repr(model.reference))
            if processor is not None:
                spec = replace(spec, mean=processor.mean, std=processor.std)
        try:
            cfg = config_cls.from_pretrained(where)
        except (OSError, ValueError) as exc:
            raise ModelError(f"model reference {model.reference!r}: cannot read a {model.kind} config "
                             f"({str(exc).strip().splitlines()[0]})") from None
    else:
        keys = {**HF_DEFAULTS[model.kind], **model.config}
        if model.kind in ("resnet", "convnext") and not {"hidden_sizes", "depths"} & set(model.config):
            # a stride-4 stem, then one stride-2 stage per extra level: keep the last feature map >= 1 x 1
            stages = max(1, min(4, int(math.log2(max(input_size // 4, 1))) + 1))
            keys.update(hidden_sizes=keys["hidden_sizes"][:stages], depths=keys["depths"][:stages])
            if model.kind == "convnext":
                keys["num_stages"] = stages
        if model.kind in ("vit", "clip-probe"):
            keys.setdefault("image_size", int(input_size))
        try:
            cfg = config_cls(**keys)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"model.config for {model.kind}: {exc}") from None
    if model.kind != "clip-probe":
        cfg.num_labels = 2
        cfg.id2label, cfg.label2id = {0: "real", 1: "fake"}, {"real": 0, "fake": 1}
    return replace(spec, hf_config=cfg.to_dict())


def build_detector(spec: DetectorSpec, pretrained: bool = False, storage: StorageConfig | None = None) -> nn.Module:
    """The network of a spec: random weights, or (``pretrained``) the reference's weights where there is one. A
    pretrained-probe always gets its frozen tower from the reference (its head starts random)."""
    kind = spec.kind
    if kind == "small-cnn":
        return SmallCNN(spec.width, spec.dropout, spec.norm)
    if kind == "pretrained-probe":
        return _build_probe(spec, storage)
    config_cls, model_cls = _hf_classes(kind)
    cfg = config_cls.from_dict(dict(spec.hf_config or {}))
    native = getattr(cfg, "image_size", None) if kind in ("vit", "clip-probe") else None
    if pretrained and spec.reference:
        from shared.models import resolve_model

        where = resolve_model(spec.reference, storage)
        kwargs = {} if kind == "clip-probe" else {"config": cfg, "ignore_mismatched_sizes": True}
        try:
            net = model_cls.from_pretrained(where, **kwargs)
        except (OSError, ValueError) as exc:
            raise ModelError(f"model reference {spec.reference!r}: cannot load "
                             f"({str(exc).strip().splitlines()[0]})") from None
    else:
        net = model_cls(cfg)
    if kind == "clip-probe":
        if native is None:
            raise ModelError(f"model reference {spec.reference!r}: its vision config has no image_size")
        return ClipProbe(net, int(native), spec.dropout)
    return HFClassifier(net, int(native) if native else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper."""
    return model.module if hasattr(model, "module") else model


def save_detector(model: nn.Module, spec: DetectorSpec, store: Storage, *parts: str) -> str:
    """detector.json + model.safetensors under ``parts``; returns the folder URI."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    store.write_bytes(save(state), *parts, WEIGHTS_FILE)
    store.write_text(json.dumps(spec.to_json(), indent=2) + "\n", *parts, SPEC_FILE)
    return store.uri(*parts)


def load_detector(uri: str, storage: StorageConfig | None = None) -> tuple[nn.Module, DetectorSpec]:
    """(network in eval mode, spec) from a train-detector stage or a detector folder, local or s3://."""
    from safetensors.torch import load

    folder = resolve_output(uri, "model", storage)
    store = Storage(folder, storage)
    if not store.exists(SPEC_FILE):
        raise ModelError(f"detector {uri}: no {SPEC_FILE} there (expected a train-detector stage or its model folder)")
    spec = DetectorSpec.from_json(store.read_json(SPEC_FILE), uri)
    model = build_detector(spec, storage=storage)
    try:
        model.load_state_dict(load(store.read_bytes(WEIGHTS_FILE)))
    except RuntimeError as exc:
        raise ModelError(f"detector {uri}: weights do not fit its spec ({str(exc).splitlines()[0]})") from None
    model.eval()
    return model, spec


@torch.no_grad()
def fake_probability(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Probability of 'fake' for a normalised batch (B, 3, H, W) -> (B,)."""
    return torch.softmax(model(x).float(), dim=-1)[:, 1]
