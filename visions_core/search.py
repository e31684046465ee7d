"""Queries against a flat index: by vector, text, image, text and image together, or an indexed item."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol, cast

import numpy as np
import numpy.typing as npt

from visions_core.errors import UnreadableItemError
from visions_core.index import FlatIndex, SearchResult
from visions_core.vectors import Matrix, MergeStrategy, merge_vectors

if TYPE_CHECKING:
    # A PIL image, a path or encoded bytes; only the embedder (and so torch) ever decodes it.
    from visions_core.encoders import ImageSource


class QueryEmbedder(Protocol):
    """What a Searcher needs from an embedder (visions_core.embedder.Embedder fits)."""

    aligner_id: str
    dim: int

    def embed_texts(self, texts: Sequence[str]) -> Matrix:
        """Unit vectors of texts, shape (n, dim)."""
        ...

    def embed_images(self, images: Sequence[ImageSource]) -> Matrix:
        """Unit vectors of images, shape (n, dim)."""
        ...


class Searcher:
    """Turns queries into vectors with an embedder and ranks an index by them, best first."""

    def __init__(self, embedder: QueryEmbedder, index: FlatIndex) -> None:
        """Pair an embedder with an index of its vectors (IndexMismatchError for another aligner or dim)."""
        index.check_compatible(aligner_id=embedder.aligner_id, dim=embedder.dim)
        self.embedder = embedder
        self.index = index

    def by_vector(
        self, vector: npt.ArrayLike, n: int = 10, exclude_ids: Iterable[int] = ()
    ) -> list[SearchResult]:
        """The n items nearest a (dim,) vector."""
        vec = np.asarray(vector, dtype=np.float32)
        if vec.ndim != 1:
            raise ValueError(f"by_vector takes one (dim,) vector, got shape {vec.shape}")
        return cast(list[SearchResult], self.index.search(vec, n=n, exclude_ids=exclude_ids))

    def text_vector(self, text: str) -> npt.NDArray[np.float32]:
        """The query vector of a text (UnreadableItemError when it is blank)."""
        if not text or not text.strip():
            raise UnreadableItemError("the query text is empty")
        return self.embedder.embed_texts([text])[0]

    def image_vector(self, image: ImageSource) -> npt.NDArray[np.float32]:
        """The query vector of a PIL image (or a path or bytes the embedder can decode)."""
        return self.embedder.embed_images([image])[0]

    def by_text(self, text: str, n: int = 10) -> list[SearchResult]:
        """The n items nearest a text query."""
        return self.by_vector(self.text_vector(text), n)

    def by_image(self, image: ImageSource, n: int = 10) -> list[SearchResult]:
        """The n items nearest an image query."""
        return self.by_vector(self.image_vector(image), n)

    def by_text_and_image(
        self,
        text: str,
        image: ImageSource,
        n: int = 10,
        strategy: MergeStrategy = "multimodal",
    ) -> list[SearchResult]:
        """The n items nearest a text and an image merged into one query, as items merge at build time."""
        merged = merge_vectors([self.image_vector(image)], [self.text_vector(text)], strategy)
        return self.by_vector(merged, n)

    def by_item(self, item_id: int, n: int = 10, exclude_self: bool = False) -> list[SearchResult]:
        """The n items nearest an indexed item (itself first with score ~1 unless exclude_self)."""
        vector = self.index.get_vector(item_id)
        return self.by_vector(vector, n, exclude_ids=(item_id,) if exclude_self else ())
