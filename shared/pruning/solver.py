"""How many KV groups and MLP channels to keep so that a given fraction of a model's parameters is removed.

Every pruned layer loses the same share of its KV groups and the same share of its MLP channels (LLM-Pruner's
local, per-layer ratio); layers outside the range keep everything. Kept channel counts are multiples of
``channel_multiple`` (fast matrix shapes). Groups are coarse (SmolLM2 has 3 KV groups per layer), so the solver
tries every attention share, lets the MLP channels make up the rest, and keeps the candidate that lands closest to
the target with attention and MLP pruned most alike. Pure Python: it runs on the driver from the config alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.errors import ConfigError


@dataclass(frozen=True)
class LayerShape:
    """What one prunable layer holds, for the solver."""

    index: int
    kv_groups: int
    group_params: int
    """Parameters removed with one KV group."""
    channels: int
    channel_params: int
    """Parameters removed with one MLP channel."""


@dataclass(frozen=True)
class LayerKeep:
    """What one pruned layer keeps."""

    index: int
    kv_groups: int
    channels: int


@dataclass(frozen=True)
class Plan:
    keep: tuple[LayerKeep, ...]
    shapes: tuple[LayerShape, ...]
    params_before: int
    params_after: int
    target_fraction: float

    @property
    def achieved_fraction(self) -> float:
        return 1.0 - self.params_after / self.params_before

    @property
    def removed(self) -> int:
        return self.params_before - self.params_after

    def to_dict(self) -> dict:
        return {"target_fraction": self.target_fraction, "achieved_fraction": round(self.achieved_fraction, 6),
                "parameters_before": self.params_before, "parameters_after": self.params_after,
                "layers": [{"layer": k.index, "kv_groups": s.kv_groups, "kv_groups_kept": k.kv_groups,
                            "channels": s.channels, "channels_kept": k.channels}
                           for k, s in zip(self.keep, self.shapes)]}


def keep_channels(channels: int, ratio: float, multiple: int) -> int:
    """Channels kept when removing ``ratio`` of ``channels``: the multiple of ``multiple`` nearest to what the ratio
    asks (at least one multiple), or all of them when that is nearer."""
    want = channels * (1.0 - ratio)
    kept = min(channels, max(multiple, round(want / multiple) * multiple))
    return channels if abs(channels - want) <= abs(kept - want) else kept


def _mlp_removed(shapes: list[LayerShape], ratio: float, multiple: int) -> tuple[int, list[int]]:
    kept = [keep_channels(s.channels, ratio, multiple) for s in shapes]
    return sum((s.channels - c) * s.channel_params for s, c in zip(shapes, kept)), kept


def _fit_mlp(shapes: list[LayerShape], need: int, multiple: int) -> tuple[int, list[int]]:
    """The MLP keep whose removed parameter count is closest to ``need`` (bisection on the shared ratio)."""
    best = _mlp_removed(shapes, 0.0, multiple)
    if need <= 0:
        return best
    lo, hi = 0.0, 1.0
    top = _mlp_removed(shapes, hi, multiple)
    if top[0] <= need:
        return top
    for _ in range(60):
        mid = (lo + hi) / 2
        removed = _mlp_removed(shapes, mid, multiple)
        if removed[0] < need:
            lo = mid
            if need - removed[0] < abs(need - best[0]):
                best = removed
        else:
            hi = mid
            if removed[0] - need < abs(need - best[0]):
                best = removed
    return best


def solve(shapes: list[LayerShape], total_params: int, fraction: float, *, channel_multiple: int = 8,
          prune_attention: bool = True, of_params: int | None = None) -> Plan:
    """Kept KV groups and channels per layer so that ``fraction`` of ``of_params`` (default: ``total_params``) is
    removed (as near as the rounding allows); a ConfigError when the layers cannot give that much."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"fraction {fraction}: must be between 0 and 1")
    if not shapes:
        raise ConfigError("no layer to prune")
    target = fraction * (of_params or total_params)
    max_groups = max(s.kv_groups for s in shapes)
    attention_shares = [j / max_groups for j in range(max_groups)] if prune_attention else [0.0]
    attention_total = sum(s.kv_groups * s.group_params for s in shapes)
    mlp_total = sum(s.channels * s.channel_params for s in shapes)
    half_step = 0.5 * channel_multiple * sum(s.channel_params for s in shapes)

    candidates = []
    for share in attention_shares:
        groups = [max(1, min(s.kv_groups, round(s.kv_groups * (1.0 - share)))) for s in shapes]
        attention_removed = sum((s.kv_groups - g) * s.group_params for s, g in zip(shapes, groups))
        mlp_removed, channels = _fit_mlp(shapes, round(target - attention_removed), channel_multiple)
        removed = attention_removed + mlp_removed
        balance = abs(attention_removed / attention_total - mlp_removed / mlp_total)
        candidates.append((abs(removed - target), balance, removed, groups, channels))

    closest = min(c[0] for c in candidates)
    good = [c for c in candidates if c[0] <= max(closest, half_step)]
    error, _, removed, groups, channels = min(good, key=lambda c: (c[1], c[0]))
    if error > half_step and removed < target:
        most = max(c[2] for c in candidates) / (of_params or total_params)
        raise ConfigError(
            f"fraction {fraction}: pruning layers {shapes[0].index}-{shapes[-1].index} can remove at most "
            f"{most:.3f} of the {of_params or total_params:,} parameters counted (each keeps at least one KV group and "
            f"{channel_multiple} channels; embeddings and norms stay); lower fraction or widen layers")
    if removed == 0:
        raise ConfigError(f"fraction {fraction}: too small to remove even {channel_multiple} channels per pruned "
                          "layer; raise fraction or lower channel_multiple")
    keep = tuple(LayerKeep(s.index, g, c) for s, g, c in zip(shapes, groups, channels))
    return Plan(keep, tuple(shapes), total_params, total_params - removed, fraction)
