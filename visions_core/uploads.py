"""Untrusted input for the app: safe names, safe zip extraction with limits, and data-root confinement."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import time
import unicodedata
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from visions_core.errors import UnsafePathError, VisionsError

MB = 1024 * 1024
_CHUNK = 1 << 16
# Windows device names stay refused so a dataset extracted here can be copied to any machine.
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
_UNSAFE_CHARS = re.compile(r"[^\w.\- ()+,@=]")
# Archive litter from macOS and Windows that is never part of a dataset.
_JUNK_PARTS = {"__MACOSX", ".DS_Store", "Thumbs.db", "desktop.ini"}


class UploadLimitError(VisionsError):
    """An upload or folder exceeds a configured size or count limit (the message names the limit)."""


@dataclass(frozen=True)
class UploadLimits:
    """Configurable ceilings for what one user may upload or index."""

    max_upload_bytes: int = 200 * MB
    max_extracted_bytes: int = 1024 * MB
    max_files: int = 5000
    max_name_length: int = 120

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> UploadLimits:
        """Limits from env-style keys (VISIONS_MAX_UPLOAD_MB, VISIONS_MAX_EXTRACTED_MB, VISIONS_MAX_FILES)."""
        default = cls()

        def number(key: str, fallback: int, scale: int = 1) -> int:
            raw = values.get(key)
            if raw is None or str(raw).strip() == "":
                return fallback
            try:
                value = float(str(raw))
            except ValueError:
                raise VisionsError(f"{key} must be a number, got {raw!r}") from None
            if value <= 0:
                raise VisionsError(f"{key} must be positive, got {raw!r}")
            return int(value * scale)

        return cls(
            max_upload_bytes=number("VISIONS_MAX_UPLOAD_MB", default.max_upload_bytes, MB),
            max_extracted_bytes=number("VISIONS_MAX_EXTRACTED_MB", default.max_extracted_bytes, MB),
            max_files=number("VISIONS_MAX_FILES", default.max_files),
        )


def _mb(n: int) -> str:
    return f"{n / MB:.1f} MB"


def safe_name(name: str, *, max_length: int = 120) -> str:
    """Reduce an untrusted file name to one harmless path component (keeps the extension, never empty)."""
    # Browsers may send a full client path; only its last component is the name.
    name = re.split(r"[\\/]", name)[-1]
    name = unicodedata.normalize("NFC", name)
    # Category C covers newlines, tabs and invisible format characters such as right-to-left overrides.
    name = "".join("_" if unicodedata.category(ch)[0] == "C" else ch for ch in name)
    name = _UNSAFE_CHARS.sub("_", name).strip(" .")
    stem, ext = os.path.splitext(name)
    ext = ext[:17]
    if stem.lower() in _RESERVED:
        stem = f"_{stem}"
    name = (stem[: max(1, max_length - len(ext))] + ext).strip(" .")
    if not name.strip("_"):
        return "file"
    return name


def safe_relpath(name: str, *, max_length: int = 120) -> PurePosixPath:
    """Turn an archive member name into a relative path, refusing absolute paths and '..' components."""
    if "\x00" in name:
        raise UnsafePathError(f"refused {name!r}: the name contains a NUL byte")
    unified = name.replace("\\", "/")
    if unified.startswith("/") or re.match(r"^[A-Za-z]:", unified):
        raise UnsafePathError(f"refused {name!r}: absolute paths are not allowed in an archive")
    parts = [p for p in unified.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafePathError(f"refused {name!r}: '..' would escape the upload folder")
    if not parts:
        raise UnsafePathError(f"refused {name!r}: empty path")
    return PurePosixPath(*(safe_name(p, max_length=max_length) for p in parts))


def new_upload_dir(data_dir: Path, label: str = "upload") -> Path:
    """Create a fresh, uniquely named folder for one upload under <data_dir>/uploads."""
    parent = Path(data_dir) / "uploads"
    parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    folder = parent / f"{stamp}-{safe_name(label, max_length=40)}-{secrets.token_hex(3)}"
    folder.mkdir()
    return folder


def _unique(dest: Path, rel: PurePosixPath, taken: set[str]) -> PurePosixPath:
    """Give colliding names (e.g. 'a b.jpg' and 'a_b.jpg' after sanitising) a numbered suffix."""
    candidate, n = rel, 1
    while str(candidate).lower() in taken or (dest / candidate).exists():
        candidate = rel.with_name(f"{rel.stem}-{n}{rel.suffix}")
        n += 1
    taken.add(str(candidate).lower())
    return candidate


def _write_stream(source: BinaryIO, target: Path, budget: int, too_big: str) -> int:
    """Copy at most `budget` bytes into a new file (never through a link); raise too_big beyond that."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    written = 0
    try:
        with os.fdopen(os.open(target, flags, 0o644), "wb") as out:
            while chunk := source.read(_CHUNK):
                written += len(chunk)
                if written > budget:
                    raise UploadLimitError(too_big)
                out.write(chunk)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return written


def save_uploads(files: Iterable[tuple[str, BinaryIO]], dest: Path, limits: UploadLimits) -> list[Path]:
    """Write uploaded (name, stream) pairs into dest under safe, unique names; all or nothing."""
    dest = Path(dest)
    saved: list[Path] = []
    taken: set[str] = set()
    total = 0
    too_big = f"the upload is larger than the limit of {_mb(limits.max_upload_bytes)}"
    try:
        for count, (name, stream) in enumerate(files, start=1):
            if count > limits.max_files:
                raise UploadLimitError(f"too many files: the limit is {limits.max_files} per upload")
            rel = _unique(dest, PurePosixPath(safe_name(name, max_length=limits.max_name_length)), taken)
            total += _write_stream(stream, dest / rel, limits.max_upload_bytes - total, too_big)
            saved.append(dest / rel)
    except BaseException:
        # dest may already hold an earlier upload (append): remove only what this call wrote.
        for path in saved:
            path.unlink(missing_ok=True)
        raise
    return saved


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _is_junk(rel: PurePosixPath) -> bool:
    return any(part in _JUNK_PARTS or part.startswith("._") for part in rel.parts)


def check_zip(archive: zipfile.ZipFile, limits: UploadLimits) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """Vet every member before anything is written: names, links, file count and declared total size."""
    members = []
    declared = 0
    for info in archive.infolist():
        rel = safe_relpath(info.filename, max_length=limits.max_name_length)
        if _is_symlink(info):
            raise UnsafePathError(f"refused {info.filename!r}: archives may not contain symbolic links")
        if info.is_dir() or _is_junk(rel):
            continue
        if info.flag_bits & 0x1:
            raise VisionsError(f"refused {info.filename!r}: encrypted archives are not supported")
        members.append((info, rel))
        if len(members) > limits.max_files:
            raise UploadLimitError(f"the archive holds more than {limits.max_files} files (the limit)")
        declared += info.file_size
        if declared > limits.max_extracted_bytes:
            raise UploadLimitError(
                f"the archive would unpack to more than {_mb(limits.max_extracted_bytes)} (the limit)"
            )
    return members


def extract_zip(source: Path | BinaryIO, dest: Path, limits: UploadLimits) -> list[Path]:
    """Safely unpack a zip into the empty folder dest; on any refusal nothing of it is left behind."""
    dest = Path(dest)
    if any(dest.iterdir()):
        raise VisionsError(f"{dest} is not empty: a zip is unpacked into a folder of its own")
    try:
        archive = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError) as exc:
        raise VisionsError(f"not a readable zip archive: {exc}") from None
    written: list[Path] = []
    try:
        with archive:
            members = check_zip(archive, limits)
            taken: set[str] = set()
            remaining = limits.max_extracted_bytes
            too_big = f"the archive unpacks to more than {_mb(limits.max_extracted_bytes)} (the limit)"
            for info, rel in members:
                rel = _unique(dest, rel, taken)
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                # Re-confine after mkdir: a pre-existing link inside dest must not redirect the write.
                confine(dest, str(rel.parent))
                # Declared sizes can lie (zip bombs): count the bytes actually inflated.
                with archive.open(info) as stream:
                    remaining -= _write_stream(stream, target, remaining, too_big)
                written.append(target)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError) as exc:
        _empty(dest)
        raise VisionsError(f"the zip archive is damaged or unsupported: {exc}") from None
    except VisionsError:
        _empty(dest)
        raise
    return written


def _empty(folder: Path) -> None:
    """Remove everything inside folder (not the folder itself) without following links."""
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def dataset_root(folder: Path) -> Path:
    """Where a dataset really starts: descend through lone wrapper folders (e.g. 'photos/' in a zip)."""
    folder = Path(folder)
    while True:
        children = [c for c in folder.iterdir() if not _is_junk(PurePosixPath(c.name))]
        if len(children) != 1 or not children[0].is_dir() or children[0].is_symlink():
            return folder
        only = children[0]
        # A mixed_dir item folder (img/ or text/ inside) is data, not a wrapper.
        if {c.name for c in only.iterdir()} & {"img", "text"}:
            return folder
        folder = only


def confine(root: Path, relative: str) -> Path:
    """Resolve a user-given path relative to root; refuse absolute paths, '..' and links that leave root."""
    if "\x00" in relative:
        raise UnsafePathError("refused the path: it contains a NUL byte")
    text = relative.strip()
    if os.path.isabs(text) or re.match(r"^[A-Za-z]:[\\/]", text):
        raise UnsafePathError(f"refused {relative!r}: give a path relative to the data root, not absolute")
    parts = PurePosixPath(text.replace("\\", "/")).parts
    if ".." in parts:
        raise UnsafePathError(f"refused {relative!r}: '..' is not allowed")
    real_root = Path(root).resolve()
    try:
        resolved = (real_root / text).resolve()
    except (RuntimeError, OSError) as exc:
        raise UnsafePathError(f"refused {relative!r}: {exc}") from None
    if not resolved.is_relative_to(real_root):
        raise UnsafePathError(f"refused {relative!r}: it leads outside the data root through a symbolic link")
    return resolved


def confine_to_roots(path: str, roots: Sequence[Path]) -> Path:
    """Accept an absolute or root-relative path only if it resolves inside one of the configured roots."""
    if not roots:
        raise UnsafePathError("no data roots are configured")
    if "\x00" in path:
        raise UnsafePathError("refused the path: it contains a NUL byte")
    if ".." in PurePosixPath(path.replace("\\", "/")).parts:
        raise UnsafePathError(f"refused {path!r}: '..' is not allowed")
    if not os.path.isabs(path):
        return confine(roots[0], path)
    try:
        resolved = Path(path).resolve()
    except (RuntimeError, OSError) as exc:
        raise UnsafePathError(f"refused {path!r}: {exc}") from None
    for root in roots:
        if resolved.is_relative_to(Path(root).resolve()):
            return resolved
    names = ", ".join(str(r) for r in roots)
    raise UnsafePathError(f"refused {path!r}: it is not inside a configured data root ({names})")


def parse_roots(value: str | Sequence[str] | None, defaults: Sequence[Path]) -> list[Path]:
    """Data roots from an os.pathsep-separated string or a list (env or secrets), else the defaults."""
    if value is None or (isinstance(value, str) and not value.strip()):
        items: Sequence[str | Path] = list(defaults)
    elif isinstance(value, str):
        items = [v for v in value.split(os.pathsep) if v.strip()]
    else:
        items = list(value)
    roots: list[Path] = []
    for item in items:
        root = Path(item).expanduser().resolve()
        if root not in roots:
            roots.append(root)
    return roots


def list_folders(root: Path, *, max_depth: int = 2, limit: int = 500) -> list[str]:
    """Sub-folders of root (relative, posix) down to max_depth; hidden folders and links are not offered."""
    real_root = Path(root).resolve()
    found: list[str] = []
    frontier = [real_root]
    for _ in range(max_depth):
        next_frontier = []
        for folder in frontier:
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                    continue
                found.append(Path(entry.path).relative_to(real_root).as_posix())
                next_frontier.append(Path(entry.path))
                if len(found) >= limit:
                    return found
        frontier = next_frontier
    return found


def check_folder(folder: Path, root: Path, *, limit: int) -> int:
    """Count the files a build of folder could read; refuse it past limit or if any link leads out of root."""
    real_root = Path(root).resolve()
    count = 0
    start = os.stat(folder)
    seen = {(start.st_dev, start.st_ino)}
    stack = [Path(folder)]
    while stack:
        try:
            entries = sorted(os.scandir(stack.pop()), key=lambda e: e.name)
        except OSError:
            continue  # the readers report unreadable folders as skipped, with the reason
        for entry in entries:
            path = Path(entry.path)
            if entry.is_symlink():
                try:
                    target = path.resolve(strict=True)
                except (OSError, RuntimeError):
                    continue  # broken links and loops are skipped by the readers
                if not target.is_relative_to(real_root):
                    shown = path.relative_to(folder).as_posix()
                    raise UnsafePathError(
                        f"refused the folder: {shown} is a link leading out of the data root"
                    )
            try:
                info = entry.stat()
            except OSError:
                continue
            if stat.S_ISDIR(info.st_mode):
                # Linked folders are followed once each, as the readers do, so loops end.
                if (info.st_dev, info.st_ino) not in seen:
                    seen.add((info.st_dev, info.st_ino))
                    stack.append(path)
                continue
            count += 1
            if count > limit:
                raise UploadLimitError(f"the folder holds more than {limit} files (the limit)")
    return count
