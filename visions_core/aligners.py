"""VSE++ projection heads and the weights/ folder format (one safetensors file plus a JSON model card)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from visions_core.errors import WeightsError

WEIGHTS_FILE = "visions.safetensors"
CARD_FILE = "model_card.json"
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"


class Aligner(nn.Module):
    """L2-normalise -> linear projection (or a 2-layer MLP) -> L2-normalise."""

    def __init__(self, in_dim: int, out_dim: int = 512, hidden: int = 0) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.hidden = in_dim, out_dim, hidden
        if hidden:
            self.proj: nn.Module = nn.Sequential(
                nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim)
            )
        else:
            self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-length projections of the encoder features x (n, in_dim) -> (n, out_dim)."""
        return F.normalize(self.proj(F.normalize(x.float(), dim=-1)), dim=-1)

    def config(self) -> dict[str, int]:
        """Shape parameters needed to rebuild this aligner."""
        return {"in_dim": self.in_dim, "out_dim": self.out_dim, "hidden": self.hidden}


def _atomic_write(path: Path, write) -> None:
    """Write via a temporary file in the same folder, then rename over the target."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_weights(out_dir: Path, tensors: dict[str, torch.Tensor], card: dict[str, Any]) -> None:
    """Write the tensors and the model card atomically; the tensors file repeats the aligner_id."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    aligner_id = str(card["aligner_id"])
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _atomic_write(
        out_dir / WEIGHTS_FILE, lambda p: save_file(flat, str(p), metadata={"aligner_id": aligner_id})
    )
    text = json.dumps(card, indent=2, sort_keys=False) + "\n"
    _atomic_write(out_dir / CARD_FILE, lambda p: p.write_text(text, encoding="utf-8"))


def read_card(weights_dir: Path) -> dict[str, Any]:
    """The model card of a weights folder; raises WeightsError naming the file when missing or corrupt."""
    path = Path(weights_dir) / CARD_FILE
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise WeightsError(f"model card not found: {path}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"model card is corrupt: {path} ({exc})") from exc
    if not isinstance(card, dict) or not card.get("aligner_id") or not isinstance(card.get("dim"), int):
        raise WeightsError(f"model card lacks aligner_id/dim: {path}")
    return card


def load_weights(weights_dir: Path, retries: int = 3) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read the card and tensors of a weights folder, checking they belong to the same aligner version."""
    weights_dir = Path(weights_dir)
    path = weights_dir / WEIGHTS_FILE
    for attempt in range(retries):
        card = read_card(weights_dir)
        try:
            with safe_open(str(path), framework="pt") as fh:
                stored_id = (fh.metadata() or {}).get("aligner_id")
            tensors = load_file(str(path))
        except FileNotFoundError as exc:
            raise WeightsError(f"weights file not found: {path}") from exc
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise WeightsError(f"weights file is corrupt: {path} ({exc})") from exc
        if stored_id == card["aligner_id"]:
            return card, tensors
        # A concurrent `train --out` may be between its two renames: wait and read both again.
        time.sleep(0.5 * (attempt + 1))
    raise WeightsError(f"weights file {path} (aligner {stored_id}) does not match {weights_dir / CARD_FILE}")


def build_aligner(
    tensors: dict[str, torch.Tensor], prefix: str, config: dict[str, int], source: Path
) -> Aligner:
    """An Aligner of the given config with the tensors under `prefix.`; WeightsError names `source`."""
    aligner = Aligner(int(config["in_dim"]), int(config["out_dim"]), int(config.get("hidden", 0)))
    state = {k[len(prefix) + 1 :]: v.float() for k, v in tensors.items() if k.startswith(prefix + ".")}
    try:
        aligner.load_state_dict(state)
    except RuntimeError as exc:
        raise WeightsError(f"weights file {source} has no valid {prefix} aligner: {exc}") from exc
    return aligner.eval()
