"""Issue 7 bad input: a generated corpus of broken and odd files with exact outcomes; readers never raise."""

import contextlib
import io
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from visions_core import readers
from visions_core.build import build_index
from visions_core.errors import DatasetNotFoundError, UnreadableItemError
from visions_core.readers import Item, Skipped, load_item, scan

# The corpus holds decompression bombs on purpose; Pillow's warning about them is expected noise here.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

LONG_TEXT = "A dog runs along the beach. " * 40_000  # ~1.1 MB, far past the text model's limit


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (only the header is valid: no real pixels)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def noisy(size: tuple[int, int] = (64, 64)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def exif_rotated() -> bytes:
    """A 40x20 image whose EXIF says 'rotate 90°': read correctly it is 20x40."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(Image.new("RGB", (40, 20), (0, 128, 0)), "JPEG", exif=exif)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def sixteen_bit() -> bytes:
    ramp = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60).astype(np.uint16)
    img = Image.fromarray(ramp)
    assert img.mode == "I;16"
    return encoded(img, "PNG")


def palette() -> bytes:
    img = Image.new("P", (16, 16), 1)
    img.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    return encoded(img, "PNG")


def alpha() -> bytes:
    img = Image.new("RGBA", (16, 16), (0, 0, 0, 0))  # fully transparent: flattened onto white
    return encoded(img, "PNG")


# name -> (bytes, expected outcome). Outcomes: ("image", mode, size, first pixel or None), ("text", text),
# ("skipped", exact reason) or ("skipped~", reason prefix) where Pillow's own wording follows.
CORPUS: dict[str, tuple[bytes, tuple]] = {
    "truncated.jpg": (
        encoded(noisy(), "JPEG")[:1500],
        ("skipped~", "cannot decode image: image file is truncated"),
    ),
    "zero-byte.jpg": (b"", ("skipped", "empty file")),
    "bomb.png": (png_header(100_000, 100_000), ("skipped", "decompression bomb (over 100,000,000 pixels)")),
    "bomb-just-over.png": (
        png_header(12_000, 10_000),
        ("skipped", "decompression bomb (12000×10000 is over 100,000,000 pixels)"),
    ),
    "cmyk.jpg": (encoded(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"), ("image", (16, 16), "red")),
    "gray16.png": (sixteen_bit(), ("image", (32, 32), None)),
    "palette.png": (palette(), ("image", (16, 16), (200, 30, 30))),
    "alpha.png": (alpha(), ("image", (16, 16), (255, 255, 255))),
    "exif-rotated.jpg": (exif_rotated(), ("image", (20, 40), None)),
    "animated.gif": (animated_gif(), ("image", (16, 16), (255, 0, 0))),
    "latin1.txt": ("café crème brûlée".encode("cp1252"), ("text", "café crème brûlée")),
    "utf16-bom.txt": ("naïve résumé, 日本".encode("utf-16"), ("text", "naïve résumé, 日本")),
    "binary.txt": (bytes(range(256)) * 8, ("skipped", "not an image or text")),
    "empty.txt": (b"", ("skipped", "empty file")),
    "whitespace.txt": (b" \n\t  \r\n ", ("skipped", "empty text (only whitespace)")),
    "long.txt": (LONG_TEXT.encode(), ("text", LONG_TEXT[: readers.MAX_TEXT_CHARS])),
    "name with spaces.txt": (b"spaces in the name", ("text", "spaces in the name")),
    "new\nline.txt": (b"a newline in the name", ("text", "a newline in the name")),
    "ünïcødé 日本.txt": (b"non-ASCII name", ("text", "non-ASCII name")),
}
# Entries that are not plain files; made by make_corpus.
SPECIAL = {
    "loop.txt": ("skipped", "symlink loop"),
    "dangling.png": ("skipped", "broken symlink"),
    "fifo.txt": ("skipped", "not a regular file (fifo, socket or device)"),
    "bad\\xffname.txt": ("skipped", "file name is not valid UTF-8"),
    "folder-loop/": ("skipped", "symlink loop (folder already visited)"),
}


def make_corpus(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, (data, _) in CORPUS.items():
        (root / name).write_bytes(data)
    (root / "loop.txt").symlink_to("loop.txt")
    (root / "dangling.png").symlink_to("no-such-target.png")
    os.mkfifo(root / "fifo.txt")
    with open(os.path.join(os.fsencode(root), b"bad\xffname.txt"), "wb") as f:
        f.write(b"a name that is not UTF-8")
    (root / "folder-loop").symlink_to(".")
    return root


def outcome(entry: Item | Skipped) -> tuple:
    """What became of one scanned entry, in the terms of CORPUS."""
    if isinstance(entry, Skipped):
        return ("skipped", entry.reason)
    try:
        loaded = load_item(entry)
    except UnreadableItemError as exc:
        return ("skipped", str(exc))
    if entry.kind == "image":
        (img,) = loaded.images
        return ("image", img.mode, img.size, img.getpixel((0, 0)))
    (text,) = loaded.texts
    return ("text", text)


def matches(got: tuple, expected: tuple) -> bool:
    kind = expected[0]
    if kind == "skipped~":
        return got[0] == "skipped" and got[1].startswith(expected[1])
    if kind == "image":
        _, size, pixel = expected
        if got[:3] != ("image", "RGB", size):
            return False
        if pixel == "red":  # CMYK -> RGB conversion is close to, not exactly, pure red
            r, g, b = got[3]
            return r > 200 and g < 60 and b < 60
        return pixel is None or got[3] == pixel
    return got == expected


def expected_outcomes() -> dict[str, tuple]:
    return {name: want for name, (_, want) in CORPUS.items()} | SPECIAL


def test_every_bad_or_odd_file_has_its_exact_outcome(tmp_path):
    root = make_corpus(tmp_path / "corpus")
    got = {entry.path: outcome(entry) for entry in scan(root, recursive=True)}
    want = expected_outcomes()
    assert sorted(got) == sorted(want)
    wrong = {name: got[name] for name in want if not matches(got[name], want[name])}
    assert not wrong


def test_the_build_skips_bad_files_with_reasons_and_indexes_the_rest(tmp_path, embedder):
    from visions_core.index import FlatIndex

    root = make_corpus(tmp_path / "corpus")
    report = build_index(root, embedder, recursive=True, batch_size=4, bucket_size=4)
    want = expected_outcomes()
    skipped = {s.path: s.reason for s in report.skipped}
    assert sorted(skipped) == sorted(n for n, w in want.items() if w[0].startswith("skipped"))
    indexed = sorted(n for n, w in want.items() if w[0] in ("image", "text"))
    assert report.added == len(indexed) and report.present == 0
    with FlatIndex.open(report.index_path) as index:
        records = {r["path"]: r for r in index.records()}
        assert sorted(records) == indexed
        assert all(records[n]["kind"] == want[n][0] for n in indexed)
        assert records["long.txt"]["snippet"].startswith("A dog runs along the beach.")
    assert report.reason_counts["empty file"] == 2 and report.reason_counts["decompression bomb"] == 2


def test_a_file_deleted_between_listing_and_reading_is_skipped(tmp_path):
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "b.txt").write_text("second")
    entries = list(scan(tmp_path))
    (tmp_path / "b.txt").unlink()
    assert outcome(entries[0]) == ("text", "first")
    assert outcome(entries[1]) == ("skipped", "file vanished before it could be read")


def test_a_file_deleted_after_listing_but_before_its_stat_is_skipped(tmp_path):
    for name in ("a.txt", "b.txt", "c.txt"):
        (tmp_path / name).write_text(name)
    entries = scan(tmp_path)
    first = next(entries)  # the folder is listed; b and c are not looked at yet
    (tmp_path / "c.txt").unlink()
    rest = list(entries)
    assert first.path == "a.txt"
    assert [(e.path, type(e).__name__) for e in rest] == [("b.txt", "Item"), ("c.txt", "Skipped")]
    assert rest[1].reason == "file vanished before it could be read"


@contextlib.contextmanager
def unprivileged():
    """Run as user 'nobody' when the tests run as root, so that file permissions are really enforced."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_an_unreadable_file_is_skipped_as_permission_denied():
    # Permissions are the kernel's real check: root bypasses them, so the scan runs with the effective uid of
    # 'nobody' (restored afterwards) in a folder that user may list.
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        (root / "readable.txt").write_text("fine")
        (root / "readable.txt").chmod(0o644)
        (root / "secret.txt").write_text("private")
        (root / "secret.txt").chmod(0o000)
        (root / "locked").mkdir(mode=0o700)
        (root / "locked" / "inside.txt").write_text("hidden")
        with unprivileged():
            with pytest.raises(PermissionError):
                (root / "secret.txt").read_bytes()
            got = {e.path: outcome(e) for e in scan(root, recursive=True)}
    assert got == {
        "locked/": ("skipped", "permission denied"),
        "readable.txt": ("text", "fine"),
        "secret.txt": ("skipped", "permission denied"),
    }


def test_an_empty_dataset_builds_an_empty_index(tmp_path, embedder):
    (tmp_path / "empty").mkdir()
    assert list(scan(tmp_path / "empty")) == []
    report = build_index(tmp_path / "empty", embedder)
    assert (report.added, report.present, report.skipped) == (0, 0, [])


def test_a_missing_dataset_is_a_clear_error_before_any_index_is_made(tmp_path, embedder):
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        build_index(tmp_path / "missing", embedder, index_path=tmp_path / "index")
    assert not (tmp_path / "index").exists()


# Real format signatures, so that Pillow's decoders (not just its format sniffing) meet the random bytes.
MAGIC_PREFIXES = [
    b"",
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff\xe0",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"\xef\xbb\xbf",
]
NAME = st.text(
    alphabet=st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=40,
).filter(lambda n: n not in (".", "..") and len(n.encode()) < 200)


# Random bytes make Pillow warn about corrupt metadata (a UserWarning) before it gives up: expected here.
@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    files=st.dictionaries(
        NAME, st.tuples(st.sampled_from(MAGIC_PREFIXES), st.binary(max_size=600)), min_size=1, max_size=6
    ),
    layout=st.sampled_from(["flat_dir", "mixed_dir"]),
)
def test_random_bytes_under_random_names_never_raise_from_the_readers(files, layout):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i, (name, (prefix, body)) in enumerate(files.items()):
            # In mixed_dir, spread the files over item folders' img/ and text/ parts.
            target = (
                root / f"item{i % 2}" / ("img", "text")[i % 3 % 2] / name
                if layout == "mixed_dir"
                else root / name
            )
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(prefix + body)
        for entry in scan(root, layout=layout, recursive=True):
            assert isinstance(entry, Item | Skipped)
            if isinstance(entry, Item):
                try:
                    loaded = load_item(entry)
                except UnreadableItemError as exc:
                    assert str(exc)
                else:
                    assert loaded.images or loaded.texts
                    assert all(img.mode == "RGB" for img in loaded.images)
                    assert all(text.strip() for text in loaded.texts)
