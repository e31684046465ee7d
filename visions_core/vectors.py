"""Vector types of the shared space, normalisation, and the merge strategies for multi-part items."""

from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

Vector = npt.NDArray[np.float32]
"""One unit-length float32 vector of the shared space, shape (dim,)."""
Matrix = npt.NDArray[np.float32]
"""Row-wise unit-length float32 vectors, shape (n, dim)."""

MergeStrategy = Literal["multimodal", "image", "text"]
MERGE_STRATEGIES: tuple[MergeStrategy, ...] = ("multimodal", "image", "text")


def l2_normalize(x: npt.ArrayLike) -> Matrix:
    """Return x as float32 with each row (or the vector) scaled to unit length; zero rows stay zero."""
    arr = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(arr, axis=-1, keepdims=True)
    return arr / np.maximum(norms, np.float32(1e-12))


def merge_vectors(
    image_vectors: Sequence[Vector] | Matrix,
    text_vectors: Sequence[Vector] | Matrix,
    strategy: MergeStrategy = "multimodal",
) -> Vector:
    """Merge an item's image and text vectors into one unit vector (mean per modality, then across)."""
    if strategy not in MERGE_STRATEGIES:
        raise ValueError(f"unknown merge strategy {strategy!r}; choose one of {', '.join(MERGE_STRATEGIES)}")
    means = []
    for kind, vecs in (("image", image_vectors), ("text", text_vectors)):
        arr = np.asarray(vecs, dtype=np.float32)
        if arr.size and strategy in (kind, "multimodal"):
            means.append(l2_normalize(arr.reshape(-1, arr.shape[-1]).mean(axis=0)))
    if not means:
        # An item with only the other modality still gets a vector rather than being lost.
        parts = [np.asarray(v, dtype=np.float32) for v in (image_vectors, text_vectors)]
        parts = [p.reshape(-1, p.shape[-1]) for p in parts if p.size]
        if not parts:
            raise ValueError("an item needs at least one image or text vector")
        return l2_normalize(np.concatenate(parts).mean(axis=0))
    return l2_normalize(np.mean(means, axis=0))
