"""The flat on-disk index: float32 bucket files searched via memory maps, SQLite metadata, a write lock."""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import posixpath
import resource
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypedDict
from urllib.parse import quote

import numpy as np
import numpy.typing as npt

from visions_core.errors import (
    IndexExistsError,
    IndexFormatError,
    IndexLockedError,
    IndexMismatchError,
    IndexNotFoundError,
    ItemNotFoundError,
    UnsafePathError,
)
from visions_core.vectors import Matrix, Vector

FORMAT_VERSION = 1
# Measured with benchmarks/bench_search.py at 1M x 512 (top-10 medians, one BLAS thread, busy 2-core box):
# 16,384-row buckets took 1.04-1.07x one in-RAM numpy scan, 4,096 rows 1.12x, 512 rows 1.33x (3.3x when only
# 256 maps were cached); 32 queries at once took half numpy's time. 16,384 also keeps files few (64 per 1M).
DEFAULT_BUCKET_SIZE = 16384
# Scores of this many (query, row) pairs are computed before one partial sort keeps the best n: few sorts
# for a single query over many buckets, bounded memory for a large batch.
SCORE_BUFFER = 1 << 22
# Each memory map holds a file descriptor: a quarter of the process's allowance goes to cached maps; buckets
# beyond are mapped anew per query.
MAX_CACHED_MAPS = max(256, min(8192, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4))
SNIPPET_CHARS = 200

DAMAGED = -1  # the format version reported for a metadata database that cannot be read
DB_NAME = "index.db"
LOCK_NAME = "write.lock"
BUCKET_DIR = "buckets"

ItemKind = Literal["image", "text", "mixed"]
KINDS: tuple[ItemKind, ...] = ("image", "text", "mixed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS config (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    bucket INTEGER NOT NULL,
    row INTEGER NOT NULL,
    path TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    size INTEGER,
    mtime REAL,
    hash TEXT,
    snippet TEXT
);
"""
_ITEM_COLUMNS = "id, bucket, row, path, kind, size, mtime, hash, snippet"


class SearchResult(NamedTuple):
    """One ranked item: its id, path relative to the data root, cosine score and kind."""

    id: int
    path: str
    score: float
    kind: str


class ItemRecord(TypedDict):
    """One stored item's metadata row."""

    id: int
    bucket: int
    row: int
    path: str
    kind: str
    size: int | None
    mtime: float | None
    hash: str | None
    snippet: str | None


class _Snapshot(NamedTuple):
    count: int
    generation: str


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _connect(db: Path, writable: bool) -> sqlite3.Connection:
    mode = "rwc" if writable else "ro"
    conn = sqlite3.connect(
        f"file:{quote(str(db))}?mode={mode}",
        uri=True,
        isolation_level=None,  # explicit BEGIN/COMMIT: one transaction per add()
        check_same_thread=False,  # shared by Streamlit sessions; guarded by FlatIndex._lock
        timeout=30,
    )
    conn.row_factory = sqlite3.Row
    if writable:
        # WAL lets readers keep answering from the last commit while a build appends.
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
    return conn


def _read_config(conn: sqlite3.Connection) -> dict[str, str]:
    return {row["key"]: row["value"] for row in conn.execute("SELECT key, value FROM config")}


def _stored_version(db: Path) -> int | None:
    """The format version written in db; None when db is not (yet) an index, DAMAGED when unreadable."""
    if not db.is_file():
        return None
    try:
        conn = sqlite3.connect(f"file:{quote(str(db))}?mode=ro", uri=True, timeout=30)
        try:
            # A create killed before its first commit leaves a database without tables: no index yet.
            if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'config'").fetchone() is None:
                return None
            row = conn.execute("SELECT value FROM config WHERE key = 'format_version'").fetchone()
        finally:
            conn.close()
        return int(row[0])
    except (sqlite3.DatabaseError, TypeError, ValueError):
        return DAMAGED


class _WriteLock:
    """An exclusive flock on <index>/write.lock; the OS releases it when the holder dies."""

    def __init__(self, index_dir: Path) -> None:
        self.path = index_dir / LOCK_NAME
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise IndexLockedError(f"cannot take the write lock {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise IndexLockedError(
                f"index is locked by {holder}: another build is writing to {index_dir}; "
                "wait for it to finish or stop it"
            ) from None
        os.ftruncate(fd, 0)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        os.pwrite(fd, f"pid {os.getpid()} ({socket.gethostname()}, since {since})\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing the descriptor releases the flock


class FlatIndex:
    """A directory of fixed-size float32 bucket files plus one SQLite metadata database."""

    def __init__(self, path: Path, conn: sqlite3.Connection, lock: _WriteLock | None) -> None:
        """Use FlatIndex.create or FlatIndex.open instead."""
        self.path = path
        self._conn: sqlite3.Connection | None = conn
        self._write_lock = lock
        self._lock = threading.RLock()
        self._maps: dict[int, np.memmap] = {}
        self._config: dict[str, str] = {}
        self._generation = ""
        self._load_config()

    # -- opening ---------------------------------------------------------------------------------------------

    @staticmethod
    def exists(path: str | os.PathLike[str]) -> bool:
        """True when path holds an index (of any format version)."""
        return _stored_version(Path(path) / DB_NAME) is not None

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        dim: int,
        aligner_id: str,
        bucket_size: int = DEFAULT_BUCKET_SIZE,
        data_root: str | os.PathLike[str] | None = None,
        overwrite: bool = False,
    ) -> FlatIndex:
        """Create an empty writable index (overwrite=True empties one); data_root defaults to the parent."""
        if int(dim) < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        if int(bucket_size) < 1:
            raise ValueError(f"bucket_size must be positive, got {bucket_size}")
        if not aligner_id:
            raise ValueError("aligner_id must not be empty")
        index_dir = Path(path).absolute()
        if index_dir.exists() and not index_dir.is_dir():
            raise IndexExistsError(f"{index_dir} exists and is not a folder")
        index_dir.mkdir(parents=True, exist_ok=True)
        root = Path(data_root).absolute() if data_root is not None else index_dir.parent
        lock = _WriteLock(index_dir)
        try:
            conn = cls._initialise(
                index_dir,
                dim=int(dim),
                aligner_id=aligner_id,
                bucket_size=int(bucket_size),
                root=root,
                overwrite=overwrite,
            )
        except BaseException:
            lock.release()
            raise
        return cls(index_dir, conn, lock)

    @staticmethod
    def _initialise(
        index_dir: Path, *, dim: int, aligner_id: str, bucket_size: int, root: Path, overwrite: bool
    ) -> sqlite3.Connection:
        db = index_dir / DB_NAME
        version = _stored_version(db)
        if version is not None and not overwrite:
            raise IndexExistsError(
                f"an index already exists at {index_dir}; rebuild it (start over) or append to it"
            )
        if version is not None and version != FORMAT_VERSION:
            # Another format cannot be emptied in place; the caller asked to start over, so remove it.
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)
        conn = _connect(db, writable=True)
        # The data root is kept relative when the index lies inside it, so the folder can move as a whole.
        stored_root = os.path.relpath(root, index_dir)
        if not all(part == ".." for part in Path(stored_root).parts):
            stored_root = str(root)
        config = {
            "format_version": str(FORMAT_VERSION),
            "dim": str(dim),
            "bucket_size": str(bucket_size),
            "aligner_id": aligner_id,
            "data_root": stored_root,
            "generation": uuid.uuid4().hex,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        try:
            # Schema, emptying and config in one transaction: a crash leaves the old index or the new one.
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("DELETE FROM items")
            conn.execute("DELETE FROM config")
            conn.executemany("INSERT INTO config (key, value) VALUES (?, ?)", config.items())
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            conn.close()
            raise
        buckets = index_dir / BUCKET_DIR
        buckets.mkdir(exist_ok=True)
        # Old vectors are garbage once the empty metadata is committed.
        for old in buckets.glob("*.f32"):
            old.unlink(missing_ok=True)
        _fsync_dir(index_dir)
        return conn

    @classmethod
    def open(cls, path: str | os.PathLike[str], writable: bool = False) -> FlatIndex:
        """Open an index; writable=True takes the write lock (IndexLockedError when held elsewhere)."""
        index_dir = Path(path).absolute()
        version = _stored_version(index_dir / DB_NAME)
        if version is None:
            raise IndexNotFoundError(f"no index at {index_dir} (build one with build_index)")
        if version == DAMAGED:
            raise IndexFormatError(f"the index at {index_dir} is damaged (unreadable {DB_NAME}); rebuild it")
        if version != FORMAT_VERSION:
            raise IndexFormatError(
                f"the index at {index_dir} has format version {version}, this VISIONS reads version "
                f"{FORMAT_VERSION}; rebuild it with --rebuild"
            )
        lock = _WriteLock(index_dir) if writable else None
        try:
            conn = _connect(index_dir / DB_NAME, writable=writable)
            return cls(index_dir, conn, lock)
        except BaseException:
            if lock is not None:
                lock.release()
            raise

    def _load_config(self) -> None:
        with self._lock:
            config = _read_config(self._db)
        try:
            self._dim = int(config["dim"])
            self._bucket_size = int(config["bucket_size"])
            self._aligner_id = config["aligner_id"]
            stored_root = config["data_root"]
            self._generation = config["generation"]
        except (KeyError, ValueError) as exc:
            raise IndexFormatError(
                f"the index at {self.path} has a damaged config ({exc}); rebuild it"
            ) from None
        root = Path(stored_root)
        self._data_root = Path(os.path.normpath(root if root.is_absolute() else self.path / root))
        self._config = config
        self._maps.clear()

    # -- properties ------------------------------------------------------------------------------------------

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise IndexNotFoundError(f"the index at {self.path} is closed")
        return self._conn

    @property
    def dim(self) -> int:
        """Dimension of the stored vectors."""
        return self._dim

    @property
    def aligner_id(self) -> str:
        """Id of the aligner whose vectors this index holds."""
        return self._aligner_id

    @property
    def bucket_size(self) -> int:
        """Rows per bucket file."""
        return self._bucket_size

    @property
    def data_root(self) -> Path:
        """Absolute folder that the stored item paths are relative to."""
        return self._data_root

    @property
    def writable(self) -> bool:
        """True when this handle holds the write lock."""
        return self._write_lock is not None

    def __len__(self) -> int:
        """Number of committed items."""
        return self._snapshot().count

    def __repr__(self) -> str:
        return f"FlatIndex({str(self.path)!r}, dim={self._dim}, aligner_id={self._aligner_id!r})"

    def check_compatible(self, aligner_id: str | None = None, dim: int | None = None) -> None:
        """Raise IndexMismatchError unless vectors of aligner_id / dim belong in this index."""
        if aligner_id is not None and aligner_id != self._aligner_id:
            raise IndexMismatchError(
                f"the index at {self.path} holds vectors of aligner {self._aligner_id!r}, "
                f"not {aligner_id!r}; rebuild it with the current model (--rebuild)"
            )
        if dim is not None and dim != self._dim:
            raise IndexMismatchError(
                f"the index at {self.path} holds {self._dim}-dimensional vectors, not {dim}-dimensional ones"
            )

    # -- paths -----------------------------------------------------------------------------------------------

    def relative_path(self, path: str | os.PathLike[str]) -> str:
        """The stored (POSIX, data-root-relative) form of path; UnsafePathError when it escapes the root."""
        raw = os.fspath(path)
        if os.path.isabs(raw):
            norm = os.path.normpath(raw)
            for root in (str(self._data_root), os.path.realpath(self._data_root)):
                rel = os.path.relpath(norm, root)
                if rel != ".." and not rel.startswith(".." + os.sep):
                    return Path(rel).as_posix()
            raise UnsafePathError(f"{raw} is outside the data root {self._data_root}")
        rel = posixpath.normpath(Path(raw).as_posix())
        if rel in ("", ".") or rel == ".." or rel.startswith("../"):
            raise UnsafePathError(f"{raw!r} is not a path inside the data root {self._data_root}")
        return rel

    def resolve(self, path: str | os.PathLike[str]) -> Path:
        """Absolute location of a stored item path under the data root."""
        return self._data_root / self.relative_path(path)

    # -- writing ---------------------------------------------------------------------------------------------

    def add(
        self,
        vectors: npt.ArrayLike,
        records: Sequence[Mapping[str, Any]],
        *,
        aligner_id: str | None = None,
    ) -> list[int]:
        """Append vectors with their records (path, kind, size, mtime, hash, snippet); ids aligned to records.

        A record whose path is already indexed (or repeated in the batch) is skipped and gets the existing id.
        """
        arr = self._checked_vectors(vectors, records, aligner_id)
        rows = [self._row_values(rec) for rec in records]
        with self._lock:
            count = self._snapshot().count
            known = self._ids_of_paths([r[0] for r in rows])
            ids: list[int] = []
            fresh: list[int] = []
            for i, row in enumerate(rows):
                if row[0] not in known:
                    known[row[0]] = count + len(fresh)
                    fresh.append(i)
                ids.append(known[row[0]])
            if fresh:
                # Vectors first (fsynced), then the metadata in one transaction: a crash in between leaves
                # rows past the committed count, which readers ignore and the next add overwrites.
                self._write_vectors(count, arr[fresh])
                bs = self._bucket_size
                values = [
                    (count + j, (count + j) // bs, (count + j) % bs, *rows[i]) for j, i in enumerate(fresh)
                ]
                self._transaction(f"INSERT INTO items ({_ITEM_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)", values)
        return ids

    def replace(
        self,
        vectors: npt.ArrayLike,
        records: Sequence[Mapping[str, Any]],
        *,
        aligner_id: str | None = None,
    ) -> list[int]:
        """Overwrite the vectors and records of items already indexed under the records' paths (kept ids).

        Crash-safe like add: the new vectors are written (fsynced) before the metadata. A crash in between
        leaves the new vector under the old content hash, so the next append sees the change again and
        writes the same result.
        """
        arr = self._checked_vectors(vectors, records, aligner_id)
        rows = [self._row_values(rec) for rec in records]
        with self._lock:
            known = self._ids_of_paths([r[0] for r in rows])
            missing = [r[0] for r in rows if r[0] not in known]
            if missing:
                raise ItemNotFoundError(f"cannot replace {missing[0]!r}: no such path in {self.path}")
            ids = [known[r[0]] for r in rows]
            for item_id, vector in zip(ids, arr, strict=True):
                self._write_vectors(item_id, vector[None, :])
            self._transaction(
                "UPDATE items SET kind = ?, size = ?, mtime = ?, hash = ?, snippet = ? WHERE id = ?",
                [(*row[1:], item_id) for row, item_id in zip(rows, ids, strict=True)],
            )
        return ids

    def _transaction(self, statement: str, values: Sequence[tuple[Any, ...]]) -> None:
        """Run one statement over many rows in a single transaction (all or nothing)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(statement, values)
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise

    def _checked_vectors(
        self, vectors: npt.ArrayLike, records: Sequence[Mapping[str, Any]], aligner_id: str | None
    ) -> Matrix:
        """Vectors as unit float32 rows, after refusing read-only handles, other aligners, shapes and NaNs."""
        if self._write_lock is None:
            raise IndexLockedError(
                f"the index at {self.path} was opened read-only; open it with writable=True"
            )
        self.check_compatible(aligner_id=aligner_id)
        arr = np.asarray(vectors, dtype=np.float32)
        if arr.ndim == 1:
            arr = arr.reshape(1, -1)
        if arr.ndim != 2 or arr.shape[1] != self._dim:
            raise IndexMismatchError(
                f"vectors of shape {arr.shape} do not fit the index at {self.path}, which holds "
                f"{self._dim}-dimensional vectors of aligner {self._aligner_id!r}"
            )
        if len(records) != len(arr):
            raise ValueError(f"{len(arr)} vectors but {len(records)} records")
        if not np.isfinite(arr).all():
            raise IndexMismatchError("vectors contain NaN or infinity and cannot be indexed")
        norms = np.linalg.norm(arr, axis=1, keepdims=True)
        if (norms < 1e-6).any():
            raise IndexMismatchError("a zero vector cannot be indexed (it has no direction)")
        return arr / norms

    def _row_values(self, record: Mapping[str, Any]) -> tuple[Any, ...]:
        if "path" not in record:
            raise ValueError("every record needs a 'path'")
        kind = record.get("kind", "image")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        snippet = record.get("snippet")
        size, mtime = record.get("size"), record.get("mtime")
        return (
            self.relative_path(record["path"]),
            kind,
            None if size is None else int(size),
            None if mtime is None else float(mtime),
            record.get("hash"),
            None if snippet is None else str(snippet)[:SNIPPET_CHARS],
        )

    def _items_where_in(self, columns: str, key: str, values: Sequence[Any]) -> Iterator[sqlite3.Row]:
        """Item rows whose key is one of values, asked in chunks below SQLite's parameter limit."""
        unique = list(dict.fromkeys(values))
        for start in range(0, len(unique), 500):
            chunk = unique[start : start + 500]
            marks = ",".join("?" * len(chunk))
            yield from self._db.execute(f"SELECT {columns} FROM items WHERE {key} IN ({marks})", chunk)

    def _ids_of_paths(self, paths: Sequence[str]) -> dict[str, int]:
        return {row["path"]: row["id"] for row in self._items_where_in("path, id", "path", paths)}

    def _bucket_file(self, bucket: int) -> Path:
        return self.path / BUCKET_DIR / f"{bucket:06d}.f32"

    def _write_vectors(self, start: int, arr: Matrix) -> None:
        bs, row_bytes = self._bucket_size, self._dim * 4
        done = 0
        while done < len(arr):
            bucket, row = divmod(start + done, bs)
            take = min(bs - row, len(arr) - done)
            target = self._bucket_file(bucket)
            created = not target.exists()
            data = memoryview(np.ascontiguousarray(arr[done : done + take], dtype="<f4").tobytes())
            fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                offset = row * row_bytes
                while data:
                    written = os.pwrite(fd, data, offset)
                    data, offset = data[written:], offset + written
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                _fsync_dir(target.parent)
            done += take

    # -- reading ---------------------------------------------------------------------------------------------

    def _snapshot(self) -> _Snapshot:
        """Committed item count and generation, read in one statement so they agree."""
        with self._lock:
            row = self._db.execute(
                "SELECT (SELECT MAX(id) FROM items), (SELECT value FROM config WHERE key = 'generation')"
            ).fetchone()
        if row[1] is None:
            raise IndexFormatError(f"the index at {self.path} lost its config; rebuild it")
        snap = _Snapshot(-1 if row[0] is None else int(row[0]), row[1])
        if snap.generation != self._generation:
            # Another process rebuilt the index: its settings and files may all have changed.
            self._load_config()
        return _Snapshot(snap.count + 1, snap.generation)

    def _check_id(self, item_id: int, count: int) -> int:
        if isinstance(item_id, bool) or not isinstance(item_id, int | np.integer):
            raise ItemNotFoundError(f"item id must be an integer, got {item_id!r}")
        if not 0 <= int(item_id) < count:
            raise ItemNotFoundError(f"no item with id {item_id} (the index holds ids 0 to {count - 1})")
        return int(item_id)

    def get_vector(self, item_id: int) -> Vector:
        """The stored unit vector of an item id."""
        item_id = self._check_id(item_id, self._snapshot().count)
        bucket, row = divmod(item_id, self._bucket_size)
        vec = np.fromfile(self._bucket_file(bucket), dtype="<f4", count=self._dim, offset=row * self._dim * 4)
        if vec.shape != (self._dim,):
            raise IndexFormatError(f"bucket file {self._bucket_file(bucket)} is truncated; rebuild the index")
        return vec.astype(np.float32)

    def get_vector_by_path(self, path: str | os.PathLike[str]) -> Vector:
        """The stored unit vector of the item at path."""
        return self.get_vector(self.get_record_by_path(path)["id"])

    def get_record(self, item_id: int) -> ItemRecord:
        """The metadata row of an item id."""
        item_id = self._check_id(item_id, self._snapshot().count)
        with self._lock:
            row = self._db.execute(f"SELECT {_ITEM_COLUMNS} FROM items WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            raise ItemNotFoundError(f"no item with id {item_id}")
        return ItemRecord(**dict(row))  # type: ignore[typeddict-item]

    def get_record_by_path(self, path: str | os.PathLike[str]) -> ItemRecord:
        """The metadata row of the item at path (relative to the data root, or absolute under it)."""
        rel = self.relative_path(path)
        with self._lock:
            row = self._db.execute(f"SELECT {_ITEM_COLUMNS} FROM items WHERE path = ?", (rel,)).fetchone()
        if row is None:
            raise ItemNotFoundError(f"{rel} is not in the index")
        return ItemRecord(**dict(row))  # type: ignore[typeddict-item]

    def contains_path(self, path: str | os.PathLike[str]) -> bool:
        """True when an item with this path is indexed."""
        rel = self.relative_path(path)
        with self._lock:
            return self._db.execute("SELECT 1 FROM items WHERE path = ?", (rel,)).fetchone() is not None

    def paths(self) -> set[str]:
        """Every indexed path (data-root-relative), e.g. to skip them before embedding during an append."""
        with self._lock:
            return {row[0] for row in self._db.execute("SELECT path FROM items")}

    def stamps(self) -> dict[str, tuple[int | None, float | None, str | None]]:
        """(size, mtime, content hash) of every indexed path, to tell unchanged items from edited ones."""
        with self._lock:
            return {
                row[0]: (row[1], row[2], row[3])
                for row in self._db.execute("SELECT path, size, mtime, hash FROM items")
            }

    def records(self, offset: int = 0, limit: int | None = None) -> list[ItemRecord]:
        """Metadata rows in id order, from offset, at most limit of them."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_ITEM_COLUMNS} FROM items ORDER BY id LIMIT ? OFFSET ?",
                (-1 if limit is None else int(limit), int(offset)),
            ).fetchall()
        return [ItemRecord(**dict(row)) for row in rows]  # type: ignore[typeddict-item]

    # -- search ----------------------------------------------------------------------------------------------

    def _bucket_rows(self, bucket: int, rows: int) -> Matrix:
        """The first rows vectors of a bucket, through a (cached) read-only memory map."""
        cached = self._maps.get(bucket)
        if cached is not None and cached.shape[0] >= rows:
            return cached[:rows]
        target = self._bucket_file(bucket)
        row_bytes = self._dim * 4
        try:
            size = target.stat().st_size
        except FileNotFoundError:
            size = 0
        if size < rows * row_bytes:
            raise IndexFormatError(
                f"bucket file {target} is shorter than its metadata says; rebuild the index"
            )
        # Map every complete row on disk so the map is reused as later appends fill the bucket.
        shape = (min(self._bucket_size, size // row_bytes), self._dim)
        mapped = np.memmap(target, dtype="<f4", mode="r", shape=shape)
        if bucket < MAX_CACHED_MAPS:
            self._maps[bucket] = mapped
        return mapped[:rows]

    def _groups(self, count: int, nq: int) -> Iterator[tuple[int, list[Matrix]]]:
        """(first id, bucket blocks) groups covering ids [0, count), each scored before one partial sort."""
        bs = self._bucket_size
        budget = max(bs, SCORE_BUFFER // nq)
        group: list[Matrix] = []
        group_start = group_rows = 0
        for bucket in range(math.ceil(count / bs)):
            rows = min(bs, count - bucket * bs)
            if group and group_rows + rows > budget:
                yield group_start, group
                group, group_start, group_rows = [], bucket * bs, 0
            group.append(self._bucket_rows(bucket, rows))
            group_rows += rows
        if group:
            yield group_start, group

    def _prepare_queries(self, query: npt.ArrayLike) -> tuple[Matrix, bool]:
        q = np.asarray(query, dtype=np.float32)
        single = q.ndim == 1
        q = q.reshape(1, -1) if single else q
        if q.ndim != 2 or q.shape[1] != self._dim:
            raise IndexMismatchError(
                f"query of shape {np.shape(query)} does not fit the index at {self.path} "
                f"({self._dim}-dimensional vectors of aligner {self._aligner_id!r})"
            )
        if not np.isfinite(q).all():
            raise IndexMismatchError("the query vector contains NaN or infinity")
        norms = np.linalg.norm(q, axis=1, keepdims=True)
        if (norms < 1e-12).any():
            raise IndexMismatchError("the query vector is zero and has no direction to search along")
        return q / norms, single

    def search(
        self, query: npt.ArrayLike, n: int = 10, exclude_ids: Iterable[int] = ()
    ) -> list[SearchResult] | list[list[SearchResult]]:
        """Exact top-n by cosine for a (dim,) query, or a list of lists for a (q, dim) batch; best first."""
        # One snapshot for the whole search: rows committed later by another process are not looked at.
        count = self._snapshot().count
        queries, single = self._prepare_queries(query)
        # The products run outside the handle's lock, so app sessions sharing this index search in parallel.
        ids, scores = self._top_n(queries, max(0, int(n)), count, np.fromiter(exclude_ids, dtype=np.int64))
        with self._lock:
            found = self._kinds_and_paths(np.unique(ids[np.isfinite(scores)]))
        results = [
            [
                SearchResult(int(i), found[int(i)][0], float(s), found[int(i)][1])
                for i, s in zip(row_ids, row_scores, strict=True)
                if np.isfinite(s)
            ]
            for row_ids, row_scores in zip(ids, scores, strict=True)
        ]
        return results[0] if single else results

    def _top_n(
        self, queries: Matrix, n: int, count: int, excluded: npt.NDArray[np.int64]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """Ids and scores of the n best rows per query (excluded/missing entries score -inf), best first."""
        nq = len(queries)
        best_ids = np.empty((nq, 0), dtype=np.int64)
        best_scores = np.empty((nq, 0), dtype=np.float32)
        if n == 0 or count == 0:
            return best_ids, best_scores
        for start, blocks in self._groups(count, nq):
            stop = start + sum(len(block) for block in blocks)
            scores = np.empty((nq, stop - start), dtype=np.float32)
            offset = 0
            for block in blocks:
                # One matrix product per bucket, straight from its memory map into the shared score buffer.
                np.matmul(queries, block.T, out=scores[:, offset : offset + len(block)])
                offset += len(block)
            hit = excluded[(excluded >= start) & (excluded < stop)] - start
            if hit.size:
                scores[:, hit] = -np.inf
            # Partial sort of this group alone, then merge its n best with the n kept so far.
            columns = _best_columns(scores, n)
            best_ids, best_scores = _keep_best(
                np.concatenate([best_ids, columns + start], axis=1),
                np.concatenate([best_scores, np.take_along_axis(scores, columns, axis=1)], axis=1),
                n,
            )
        order = np.lexsort((best_ids, -best_scores), axis=1)
        return np.take_along_axis(best_ids, order, axis=1), np.take_along_axis(best_scores, order, axis=1)

    def _kinds_and_paths(self, ids: npt.NDArray[np.int64]) -> dict[int, tuple[str, str]]:
        id_list = [int(i) for i in ids]
        found = {
            row["id"]: (row["path"], row["kind"])
            for row in self._items_where_in("id, path, kind", "id", id_list)
        }
        missing = set(id_list) - found.keys()
        if missing:
            raise IndexFormatError(f"the index at {self.path} lost the metadata of ids {sorted(missing)[:5]}")
        return found

    # -- closing ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the database, drop the memory maps and release the write lock (idempotent)."""
        with self._lock:
            self._maps.clear()
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            if self._write_lock is not None:
                self._write_lock.release()
                self._write_lock = None

    def __enter__(self) -> FlatIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _best_columns(scores: npt.NDArray[np.float32], n: int) -> npt.NDArray[np.int64]:
    """Column indices of the n highest scores per row (unordered), by partial sort."""
    if scores.shape[1] <= n:
        return np.broadcast_to(np.arange(scores.shape[1], dtype=np.int64), scores.shape)
    return np.argpartition(-scores, n - 1, axis=1)[:, :n].astype(np.int64, copy=False)


def _keep_best(
    ids: npt.NDArray[np.int64], scores: npt.NDArray[np.float32], n: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """The n highest-scoring (id, score) columns per row (unordered)."""
    columns = _best_columns(scores, n)
    return np.take_along_axis(ids, columns, axis=1), np.take_along_axis(scores, columns, axis=1)
