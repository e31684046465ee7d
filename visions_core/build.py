"""Dataset folder -> flat index: decode in worker threads, embed in batches, commit every batch."""

from __future__ import annotations

import os
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from visions_core import readers
from visions_core.errors import (
    IndexExistsError,
    IndexMismatchError,
    UnreadableItemError,
)
from visions_core.readers import Item, LoadedItem, Skipped
from visions_core.vectors import Matrix, MergeStrategy, merge_vectors

if TYPE_CHECKING:
    import torch

    from visions_core.embedder import Embedder
    from visions_core.index import FlatIndex

BuildMode = Literal["create", "append", "rebuild"]
BUILD_MODES: tuple[BuildMode, ...] = ("create", "append", "rebuild")
DEFAULT_INDEX_NAME = "index"
Progress = Callable[[int, int], None]
"""Called as progress(items_done, items_total): once with 0 at the start, then after every item."""


@dataclass
class BuildReport:
    """What a build did: items added, updated (content changed), already present, skipped, seconds."""

    index_path: Path
    added: int = 0
    updated: int = 0
    present: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def reason_counts(self) -> dict[str, int]:
        """Files skipped per reason (details after ':' or '(' folded), most first, then by name."""
        counts = Counter(reason_category(s.reason) for s in self.skipped)
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


@dataclass
class _Prepared:
    """An item decoded and preprocessed by a worker thread, ready for the embedder."""

    item: Item
    kind: str
    loaded: LoadedItem
    pixels: list[torch.Tensor]


def reason_category(reason: str) -> str:
    """The general part of a skip reason, e.g. 'cannot decode image' for 'cannot decode image: truncated'."""
    return re.split(r": | \(", reason, maxsplit=1)[0]


def default_index_path(data_dir: str | os.PathLike[str]) -> Path:
    """Where an index goes when no path is given: <data_dir>/index."""
    return Path(data_dir) / DEFAULT_INDEX_NAME


def build_index(
    data_dir: str | os.PathLike[str],
    embedder: Embedder,
    *,
    index_path: str | os.PathLike[str] | None = None,
    layout: str = "flat_dir",
    bucket_size: int | None = None,
    mode: BuildMode = "create",
    recursive: bool = False,
    batch_size: int = 32,
    progress: Progress | None = None,
    strategy: MergeStrategy = "multimodal",
    workers: int | None = None,
) -> BuildReport:
    """Index every item of data_dir; bad files are skipped and reported, every batch is committed."""
    from visions_core.index import FlatIndex

    started = time.perf_counter()
    root = readers.check_data_dir(data_dir).absolute()
    if mode not in BUILD_MODES:
        raise ValueError(f"mode must be one of {', '.join(BUILD_MODES)}, got {mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    layout = readers.canonical_layout(layout)
    target = Path(index_path).absolute() if index_path is not None else default_index_path(root)
    report = BuildReport(index_path=target)
    # An index in the default place is never data either, even while building one elsewhere.
    excluded = [target] + ([default_index_path(root)] if FlatIndex.exists(default_index_path(root)) else [])
    with _open_index(FlatIndex, target, root, embedder, mode, bucket_size) as index:
        # What an append already holds: unchanged items are skipped, edited ones are embedded again.
        stamps = index.stamps() if len(index) else {}
        total = readers.count(root, layout, recursive, exclude=excluded)
        if progress is not None:
            progress(0, total)
        done = 0
        pending: deque[Future[_Prepared | Skipped]] = deque()
        batch: list[_Prepared] = []

        def tick(count: int = 1) -> None:
            nonlocal done
            done += count
            if progress is not None:
                progress(done, total)

        def collect(result: _Prepared | Skipped) -> None:
            if isinstance(result, Skipped):
                report.skipped.append(result)
                tick()
                return
            stored = stamps.get(result.item.path)
            if stored is not None and stored[2] == result.loaded.content_hash:
                # Touched but not edited: nothing to embed.
                report.present += 1
                tick()
                return
            report.skipped.extend(result.loaded.skipped)
            batch.append(result)
            if len(batch) >= batch_size:
                flush()

        def flush() -> None:
            added, updated = _commit(index, embedder, batch, strategy, stamps)
            report.added += added
            report.updated += updated
            tick(len(batch))
            batch.clear()

        # Workers decode the next items while the main thread runs the model on the current batch; the
        # queue bound keeps memory at a few batches whatever the dataset size.
        with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
            for entry in readers.scan(root, layout, recursive, exclude=excluded):
                if isinstance(entry, Skipped):
                    report.skipped.append(entry)
                    tick()
                elif entry.path in stamps and _unchanged(entry, stamps[entry.path]):
                    report.present += 1
                    tick()
                else:
                    pending.append(pool.submit(_prepare, entry))
                    while len(pending) >= 2 * batch_size:
                        collect(pending.popleft().result())
            while pending:
                collect(pending.popleft().result())
        if batch:
            flush()
    # Listing-time and decoding-time skips arrive interleaved; sorted, the list reads the same every run.
    report.skipped.sort(key=lambda s: s.path)
    report.seconds = time.perf_counter() - started
    return report


def _open_index(
    flat_index: type[FlatIndex],
    target: Path,
    root: Path,
    embedder: Embedder,
    mode: BuildMode,
    bucket_size: int | None,
) -> FlatIndex:
    """Create, reopen for append, or empty the index as the mode asks, refusing mismatched ones."""
    exists = flat_index.exists(target)
    if exists and mode == "create":
        raise IndexExistsError(
            f"an index already exists at {target}; append to it (new files only) or rebuild it (start over)"
        )
    if exists and mode == "append":
        index = flat_index.open(target, writable=True)
        try:
            index.check_compatible(aligner_id=embedder.aligner_id, dim=embedder.dim)
            if os.path.realpath(index.data_root) != os.path.realpath(root):
                raise IndexMismatchError(
                    f"the index at {target} was built from {index.data_root}, not {root}; "
                    "append from the same folder or rebuild it"
                )
        except BaseException:
            index.close()
            raise
        return index
    options: dict[str, Any] = {} if bucket_size is None else {"bucket_size": bucket_size}
    return flat_index.create(
        target,
        dim=embedder.dim,
        aligner_id=embedder.aligner_id,
        data_root=root,
        overwrite=mode == "rebuild",
        **options,
    )


def _prepare(item: Item) -> _Prepared | Skipped:
    """Worker-thread step: read, decode and preprocess one item; any failure becomes a Skipped."""
    from visions_core.encoders import preprocess

    try:
        loaded = readers.load_item(item)
        pixels = [preprocess(image) for image in loaded.images]
    except UnreadableItemError as exc:
        return Skipped(item.path, str(exc))
    except Exception as exc:
        # One odd file must not end a build of thousands: name it and go on.
        return Skipped(item.path, f"cannot read: {type(exc).__name__}: {exc}")
    kind = loaded.kind
    loaded.images = []  # the pixels are all the embedder needs; free the decoded images early
    return _Prepared(item, kind, loaded, pixels)


def _unchanged(item: Item, stored: tuple[int | None, float | None, str | None]) -> bool:
    """True when the item's files still have the recorded size and modification time (a stat, no read)."""
    try:
        stats = [file.stat() for file in item.files]
    except OSError:
        return False
    return stored[0] == sum(st.st_size for st in stats) and stored[1] == max(
        (st.st_mtime for st in stats), default=0.0
    )


def _commit(
    index: FlatIndex,
    embedder: Embedder,
    batch: list[_Prepared],
    strategy: MergeStrategy,
    stamps: dict[str, Any],
) -> tuple[int, int]:
    """Embed a batch (images in one call, texts in one call); add new items, replace edited ones."""
    vectors = np.stack(list(_item_vectors(embedder, batch, strategy)))
    records = [
        {
            "path": prep.item.path,
            "kind": prep.kind,
            "size": prep.loaded.size,
            "mtime": prep.loaded.mtime,
            "hash": prep.loaded.content_hash,
            "snippet": prep.loaded.snippet or None,
        }
        for prep in batch
    ]
    edited = np.array([prep.item.path in stamps for prep in batch])
    if edited.any():
        index.replace(
            vectors[edited],
            [r for r, e in zip(records, edited, strict=True) if e],
            aligner_id=embedder.aligner_id,
        )
    if not edited.all():
        index.add(
            vectors[~edited],
            [r for r, e in zip(records, edited, strict=True) if not e],
            aligner_id=embedder.aligner_id,
        )
    return int((~edited).sum()), int(edited.sum())


def _item_vectors(embedder: Embedder, batch: list[_Prepared], strategy: MergeStrategy) -> Iterator[Matrix]:
    """One unit vector per prepared item, in order."""
    import torch

    pixels = [p for prep in batch for p in prep.pixels]
    texts = [t for prep in batch for t in prep.loaded.texts]
    empty = np.zeros((0, embedder.dim), dtype=np.float32)
    image_vecs = embedder.embed_pixels(torch.stack(pixels)) if pixels else empty
    text_vecs = embedder.embed_texts(texts) if texts else empty
    i = t = 0
    for prep in batch:
        ni, nt = len(prep.pixels), len(prep.loaded.texts)
        mine_i, mine_t = image_vecs[i : i + ni], text_vecs[t : t + nt]
        i, t = i + ni, t + nt
        if ni + nt == 1:
            yield (mine_i if ni else mine_t)[0]
        else:
            yield merge_vectors(mine_i, mine_t, strategy)
