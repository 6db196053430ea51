"""Training checkpoints of every Ray Train stage (prune importance, distill, train-detector): a state and the
fingerprint of what wrote it, so a checkpoint is never resumed under a different config or different data.

    <dir>/state.pt           torch.save of the state: tensors, numbers, strings, lists and dicts only, loaded back
                             with weights_only=True (a checkpoint cannot run code when it is read)
    <dir>/fingerprint.json   what wrote it, e.g. {"config": "<config hash>", "data": "<hash of the rows>"}
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch

from shared.errors import ModelError

STATE_FILE = "state.pt"
FINGERPRINT_FILE = "fingerprint.json"


def save_training_state(folder: str | Path, state: dict[str, Any], fingerprint: dict[str, Any]) -> None:
    """Write ``state`` and ``fingerprint`` into ``folder`` (a local directory Ray Train then uploads)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
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


def load_training_state(folder: str | Path, expected: dict[str, Any], where: str, job: str = "training"
                        ) -> dict[str, Any]:
    """The state in ``folder`` after checking its fingerprint against ``expected``; ``where`` names it in errors."""
    folder = Path(folder)
    if not (folder / STATE_FILE).is_file() or not (folder / FINGERPRINT_FILE).is_file():
        raise ModelError(f"checkpoint {where}: no {STATE_FILE} / {FINGERPRINT_FILE} (not a {job} checkpoint)")
    check_fingerprint(expected, json.loads((folder / FINGERPRINT_FILE).read_text()), where)
    try:
        return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ModelError(f"checkpoint {where}: {STATE_FILE} holds objects other than tensors and plain values; it is "
                         "not loaded (a checkpoint must not run code when it is read)") from None
