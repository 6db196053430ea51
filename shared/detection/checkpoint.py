"""Training checkpoints of a detector: model, optimiser, difficulty state and history, plus a fingerprint of the
config and mixture that wrote them, so a checkpoint is never resumed under a different config.

    <dir>/state.pt           torch.save of {"model", "optimizer", "booster", "epoch", "history"} (weights_only-safe)
    <dir>/fingerprint.json   {"config": {...}, "mixture": "<hash of the indexed rows>"}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from shared.errors import ModelError

STATE_FILE = "state.pt"
FINGERPRINT_FILE = "fingerprint.json"


def save_training_state(folder: str | Path, state: dict[str, Any], fingerprint: dict[str, Any]) -> None:
    folder = Path(folder)
    torch.save(state, folder / STATE_FILE)
    (folder / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")


def differences(expected: Any, found: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two JSON trees differ, with both values."""
    if isinstance(expected, dict) and isinstance(found, dict):
        out: list[str] = []
        for key in sorted(set(expected) | set(found)):
            out += differences(expected.get(key), found.get(key), f"{prefix}{key}.")
        return out
    if expected != found:
        return [f"{prefix.rstrip('.')}: {json.dumps(found)} there, {json.dumps(expected)} here"]
    return []


def check_fingerprint(expected: dict[str, Any], found: dict[str, Any], where: str) -> None:
    """A ModelError naming the first differing settings when a checkpoint was written under another config."""
    diff = differences(expected, found)
    if diff:
        more = f" (and {len(diff) - 2} more)" if len(diff) > 2 else ""
        raise ModelError(f"checkpoint {where} was written by a different config ({'; '.join(diff[:2])}{more}); "
                         "it cannot be resumed: start a fresh run or use the same settings")


def load_training_state(folder: str | Path, expected: dict[str, Any], where: str) -> dict[str, Any]:
    folder = Path(folder)
    if not (folder / STATE_FILE).is_file() or not (folder / FINGERPRINT_FILE).is_file():
        raise ModelError(f"checkpoint {where}: no {STATE_FILE} / {FINGERPRINT_FILE} (not a train-detector checkpoint)")
    check_fingerprint(expected, json.loads((folder / FINGERPRINT_FILE).read_text()), where)
    return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
