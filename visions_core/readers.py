"""Dataset layouts: list a folder's items (flat_dir, mixed_dir) and load them, skipping bad files."""

from __future__ import annotations

import codecs
import errno
import hashlib
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

from PIL import Image

from visions_core.errors import DatasetNotFoundError, UnreadableItemError

Kind = Literal["image", "text", "mixed"]
Layout = Literal["flat_dir", "mixed_dir", "simple_dir"]
LAYOUTS: tuple[Layout, ...] = ("flat_dir", "mixed_dir", "simple_dir")
# simple_dir is the original tool's name for mixed_dir; both are accepted.
_CANONICAL_LAYOUT = {"flat_dir": "flat_dir", "mixed_dir": "mixed_dir", "simple_dir": "mixed_dir"}
IMAGE_FOLDER = "img"
TEXT_FOLDER = "text"

# Larger files are refused before reading so a stray disk image cannot exhaust memory.
MAX_FILE_BYTES = 256 * 2**20
# Far beyond the text encoder's token limit (it truncates again); bounds tokenizer work on huge files.
MAX_TEXT_CHARS = 20_000
SNIPPET_CHARS = 200
_SNIFF_BYTES = 8192
# Encodings tried, in order, for text without a byte-order mark (latin-1 decodes anything, so it is last).
_FALLBACK_ENCODINGS = ("utf-8", "cp1252", "latin-1")
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_TEXT_CONTROLS_OK = frozenset("\t\n\r\f\v\x1b")


@dataclass(frozen=True)
class Item:
    """One dataset item: its path relative to the data root (posix), its kind and its image and text files."""

    path: str
    kind: Kind
    images: tuple[Path, ...] = ()
    texts: tuple[Path, ...] = ()

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file of the item, images first."""
        return self.images + self.texts


@dataclass(frozen=True)
class Skipped:
    """A file or item left out, with the reason shown to the user."""

    path: str
    reason: str


@dataclass
class LoadedItem:
    """An item's decoded content (RGB images, texts) plus what the index records about it."""

    images: list[Image.Image]
    texts: list[str]
    skipped: list[Skipped] = field(default_factory=list)
    size: int = 0
    mtime: float = 0.0
    content_hash: str = ""

    @property
    def kind(self) -> Kind:
        """image, text or mixed, from what could actually be read."""
        if self.images and self.texts:
            return "mixed"
        return "image" if self.images else "text"

    @property
    def snippet(self) -> str:
        """The start of the first text on one line, for result lists ('' for image-only items)."""
        return " ".join(self.texts[0].split())[:SNIPPET_CHARS] if self.texts else ""


def canonical_layout(layout: str) -> str:
    """Map a layout name (flat_dir, mixed_dir or its alias simple_dir) to flat_dir or mixed_dir."""
    try:
        return _CANONICAL_LAYOUT[layout]
    except KeyError:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}") from None


def check_data_dir(data_dir: str | os.PathLike[str]) -> Path:
    """data_dir as a Path; DatasetNotFoundError when it is missing or not a folder."""
    root = Path(data_dir)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DatasetNotFoundError(f"data directory {root} {what}")
    return root


def scan(
    data_dir: str | os.PathLike[str],
    layout: str = "flat_dir",
    recursive: bool = False,
    exclude: Iterable[str | os.PathLike[str]] = (),
) -> Iterator[Item | Skipped]:
    """A dataset folder's items in name order, outside the `exclude` folders; bad entries come as Skipped."""
    root = check_data_dir(data_dir)
    excluded = frozenset(os.path.realpath(p) for p in exclude)
    if canonical_layout(layout) == "flat_dir":
        return _scan_flat(root, recursive, excluded)
    return _scan_mixed(root, excluded)


def count(
    data_dir: str | os.PathLike[str],
    layout: str = "flat_dir",
    recursive: bool = False,
    exclude: Iterable[str | os.PathLike[str]] = (),
) -> int:
    """About how many entries scan() yields, from listings alone (no file opened): for progress bars."""
    root = Path(data_dir)
    excluded = frozenset(os.path.realpath(p) for p in exclude)
    if canonical_layout(layout) == "flat_dir":
        return sum(1 for _ in _walk(root, recursive, excluded))
    names = _listdir(root)
    return sum(1 for name in names if isinstance(name, Skipped) or not _is_excluded(root / name, excluded))


def item_at(path: str | os.PathLike[str]) -> Item:
    """The item a query path names: a file (image or text by content) or a mixed_dir item folder."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError as exc:
        raise UnreadableItemError(f"{p}: no such file or folder") from exc
    except OSError as exc:
        raise UnreadableItemError(f"{p}: {_os_reason(exc, p)}") from exc
    if stat.S_ISDIR(st.st_mode):
        found = _mixed_item(p, p.name, frozenset())[-1]
    elif stat.S_ISREG(st.st_mode):
        found = _file_item(p, p.name, st)
    else:
        found = Skipped(p.name, "not a regular file")
    if isinstance(found, Skipped):
        raise UnreadableItemError(f"{p}: {found.reason}")
    return found


def load_item(item: Item) -> LoadedItem:
    """Read and decode an item's files; raises UnreadableItemError(reason) when nothing usable remains."""
    loaded = LoadedItem(images=[], texts=[])
    digest = hashlib.blake2b(digest_size=16)
    errors: list[Skipped] = []
    for kind, files in (("image", item.images), ("text", item.texts)):
        for file in files:
            try:
                data, st = _read_bytes(file)
                if kind == "image":
                    loaded.images.append(_decode_image(data))
                else:
                    loaded.texts.append(_decode_text_file(data))
            except UnreadableItemError as exc:
                errors.append(Skipped(_part_path(item, file), str(exc)))
                continue
            # Length-prefixed so two items whose concatenated bytes agree still hash apart.
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
            loaded.size += st.st_size
            loaded.mtime = max(loaded.mtime, st.st_mtime)
    if not loaded.images and not loaded.texts:
        if len(item.files) == 1 and errors:
            raise UnreadableItemError(errors[0].reason)
        detail = f" ({errors[0].reason}{' …' if len(errors) > 1 else ''})" if errors else ""
        raise UnreadableItemError(f"no readable image or text{detail}")
    loaded.skipped = errors
    loaded.content_hash = digest.hexdigest()
    return loaded


def _part_path(item: Item, file: Path) -> str:
    """The dataset-relative path of one file of an item."""
    if len(item.files) == 1:
        return item.path
    return f"{item.path}/{file.parent.name}/{file.name}"


def _scan_flat(root: Path, recursive: bool, excluded: frozenset[str]) -> Iterator[Item | Skipped]:
    """flat_dir: every regular file is an item, its kind decided by content."""
    for entry in _walk(root, recursive, excluded):
        if isinstance(entry, Skipped):
            yield entry
        else:
            rel, path, st = entry
            yield _file_item(path, rel, st)


def _scan_mixed(root: Path, excluded: frozenset[str]) -> Iterator[Item | Skipped]:
    """mixed_dir: every sub-folder is one item with img/ and text/ inside."""
    for name in _listdir(root):
        if isinstance(name, Skipped):
            yield name
            continue
        path = root / name
        if _is_excluded(path, excluded):
            continue
        st = _stat(path, name)
        if isinstance(st, Skipped):
            yield st
        elif stat.S_ISDIR(st.st_mode):
            yield from _mixed_item(path, name, excluded)
        else:
            yield Skipped(name, "not an item folder (mixed_dir wants a sub-folder per item with img/, text/)")


def _mixed_item(path: Path, rel: str, excluded: frozenset[str]) -> list[Item | Skipped]:
    """An item folder's unusable parts (as Skipped), then the item from its img/ and text/ (or Skipped)."""
    parts: dict[str, list[Path]] = {IMAGE_FOLDER: [], TEXT_FOLDER: []}
    out: list[Item | Skipped] = []
    for folder, files in parts.items():
        sub = path / folder
        if not sub.is_dir():
            continue
        for entry in _walk(sub, False, excluded):
            if isinstance(entry, Skipped):
                # A bad part does not sink the item; a folder with no good part is skipped below.
                out.append(Skipped(f"{rel}/{folder}/{entry.path}", entry.reason))
            else:
                files.append(entry[1])
    images, texts = tuple(parts[IMAGE_FOLDER]), tuple(parts[TEXT_FOLDER])
    if not images and not texts:
        out.append(Skipped(rel, f"no files in {IMAGE_FOLDER}/ or {TEXT_FOLDER}/"))
    else:
        kind: Kind = "mixed" if images and texts else ("image" if images else "text")
        out.append(Item(rel, kind, images, texts))
    return out


def _walk(
    root: Path, recursive: bool, excluded: frozenset[str]
) -> Iterator[tuple[str, Path, os.stat_result] | Skipped]:
    """Regular files under root in name order as (posix relative path, path, stat); hidden names ignored."""
    visited = {_dir_key(root)} - {None}
    # An explicit stack, not recursion, so a very deep tree cannot overflow Python's stack.
    stack: list[tuple[Path, str]] = [(root, "")]
    while stack:
        folder, prefix = stack.pop()
        subdirs: list[tuple[Path, str]] = []
        for name in _listdir(folder, prefix):
            if isinstance(name, Skipped):
                yield name
                continue
            path, rel = folder / name, prefix + name
            st = _stat(path, rel)
            if isinstance(st, Skipped):
                yield st
            elif stat.S_ISDIR(st.st_mode):
                # Only folders can be excluded (the index is one): files skip the realpath syscalls.
                if not recursive or _is_excluded(path, excluded):
                    continue
                key = (st.st_dev, st.st_ino)
                if key in visited:
                    yield Skipped(rel + "/", "symlink loop (folder already visited)")
                else:
                    visited.add(key)
                    subdirs.append((path, rel + "/"))
            elif stat.S_ISREG(st.st_mode):
                yield rel, path, st
            else:
                yield Skipped(rel, "not a regular file (fifo, socket or device)")
        stack.extend(reversed(subdirs))


def _listdir(folder: Path, prefix: str = "") -> Iterator[str | Skipped]:
    """Visible entry names of a folder in order; names that cannot be stored as UTF-8 come out as Skipped."""
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        yield Skipped(prefix or ".", _os_reason(exc, folder))
        return
    for name in names:
        if name.startswith("."):
            continue
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            shown = os.fsencode(name).decode("utf-8", "backslashreplace")
            yield Skipped(prefix + shown, "file name is not valid UTF-8")
            continue
        yield name


def _stat(path: Path, rel: str) -> os.stat_result | Skipped:
    """stat following links, or the reason it failed."""
    try:
        return os.stat(path)
    except OSError as exc:
        return Skipped(rel, _os_reason(exc, path))


def _os_reason(exc: OSError, path: Path) -> str:
    """A short user-facing reason for an OS error on a path."""
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    if isinstance(exc, FileNotFoundError):
        return "broken symlink" if os.path.islink(path) else "file vanished before it could be read"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "is a folder, not a file"
    return f"cannot read ({exc.strerror or type(exc).__name__})"


def _is_excluded(path: Path, excluded: frozenset[str]) -> bool:
    """True when path is (a link to) an excluded folder such as the index."""
    return bool(excluded) and os.path.realpath(path) in excluded


def _dir_key(path: Path) -> tuple[int, int] | None:
    """Device and inode of a folder, to notice symlink cycles (None if unreadable; listing says why)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _file_item(path: Path, rel: str, st: os.stat_result) -> Item | Skipped:
    """Decide from its first bytes whether a file is an image, a text, or neither."""
    if st.st_size == 0:
        return Skipped(rel, "empty file")
    if st.st_size > MAX_FILE_BYTES:
        return Skipped(rel, f"file too large (over {MAX_FILE_BYTES // 2**20} MiB)")
    try:
        f, _ = _open_regular(path)
        with f:
            head = f.read(_SNIFF_BYTES)
            f.seek(0)
            is_image = _opens_as_image(f)
    except UnreadableItemError as exc:
        return Skipped(rel, str(exc))
    except OSError as exc:
        return Skipped(rel, _os_reason(exc, path))
    if is_image:
        return Item(rel, "image", images=(path,))
    if _decode_text(head, final=len(head) < _SNIFF_BYTES) is not None:
        return Item(rel, "text", texts=(path,))
    return Skipped(rel, "not an image or text")


def _opens_as_image(f: BinaryIO) -> bool:
    """True when Pillow recognises the file's header (decoding happens later)."""
    try:
        with Image.open(f) as img:
            return bool(img.format)
    except Image.DecompressionBombError:
        return True
    except Exception:
        # Pillow raises many types on foreign data; any of them just means "not an image".
        return False


def _open_regular(path: Path) -> tuple[BinaryIO, os.stat_result]:
    """Open a regular file for reading without ever blocking on a fifo; raises UnreadableItemError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise UnreadableItemError(_os_reason(exc, path)) from exc
    f = os.fdopen(fd, "rb")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        f.close()
        raise UnreadableItemError("not a regular file (fifo, socket or device)")
    return f, st


def _read_bytes(path: Path) -> tuple[bytes, os.stat_result]:
    """The bytes and stat of a regular file of at most MAX_FILE_BYTES; raises UnreadableItemError."""
    f, st = _open_regular(path)
    try:
        with f:
            if st.st_size > MAX_FILE_BYTES:
                raise UnreadableItemError(f"file too large (over {MAX_FILE_BYTES // 2**20} MiB)")
            return f.read(MAX_FILE_BYTES + 1), st
    except OSError as exc:
        raise UnreadableItemError(_os_reason(exc, path)) from exc


def _decode_image(data: bytes) -> Image.Image:
    """Decode image bytes to RGB through the engine's loader (which also refuses decompression bombs)."""
    # Imported here so that listing a folder (and the CLI's argument checks) never pays for loading torch.
    from visions_core import encoders

    if not data:
        raise UnreadableItemError("empty file")
    try:
        return encoders.load_image(data, min_side=encoders.DECODE_MIN_SIDE)
    except UnreadableItemError:
        raise
    except Exception as exc:
        # Pillow's decoders raise assorted types on hostile data; the build must go on.
        raise UnreadableItemError(f"cannot decode image: {type(exc).__name__}") from exc


def _decode_text_file(data: bytes) -> str:
    """Decode a text file's bytes (UTF-8, BOM-marked UTF-16/32, else cp1252/latin-1 when it reads as text)."""
    if not data:
        raise UnreadableItemError("empty file")
    head = data[: MAX_TEXT_CHARS * 4]
    text = _decode_text(head, final=len(head) == len(data))
    if text is None:
        raise UnreadableItemError("not text (binary data or unknown encoding)")
    if not text.strip():
        raise UnreadableItemError("empty text (only whitespace)")
    return text[:MAX_TEXT_CHARS]


def _decode_text(data: bytes, final: bool = True) -> str | None:
    """The text in data, or None when it looks binary; final=False tolerates a character cut at the end."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            candidates: tuple[str, ...] = (encoding,)
            break
    else:
        if b"\x00" in data:
            return None
        candidates = _FALLBACK_ENCODINGS
    for encoding in candidates:
        try:
            text = codecs.getincrementaldecoder(encoding)("strict").decode(data, final=final)
        except (UnicodeDecodeError, ValueError):
            continue
        if _looks_like_text(text):
            return text
    return None


def _looks_like_text(text: str) -> bool:
    """True unless the string holds control characters that text files do not (a sign of binary data)."""
    controls = sum(1 for ch in text if (ch < " " or "\x7f" <= ch <= "\x9f") and ch not in _TEXT_CONTROLS_OK)
    return controls == 0
