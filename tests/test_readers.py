"""Readers: flat_dir and mixed_dir layouts, kinds decided by content, loading, hashing, the excluded index."""

import shutil
from pathlib import Path

import pytest
from PIL import Image

from visions_core import readers
from visions_core.errors import DatasetNotFoundError, UnreadableItemError
from visions_core.readers import Item, Skipped, item_at, load_item, scan


def write_png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (32, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="PNG")
    return path


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def outcomes(data_dir: Path, **kwargs) -> dict[str, str]:
    """path -> kind for items, 'skipped: reason' for skipped entries."""
    return {
        e.path: (e.kind if isinstance(e, Item) else f"skipped: {e.reason}") for e in scan(data_dir, **kwargs)
    }


@pytest.fixture
def flat(tmp_path: Path) -> Path:
    root = tmp_path / "flat"
    write_png(root / "red.png", (255, 0, 0))
    # Content decides the kind, whatever the extension says.
    write_png(root / "actually_an_image.txt", (0, 0, 255))
    write_text(root / "caption.txt", "A brown dog runs across the grass.")
    write_text(root / "looks_like.jpg", "Two children play football on a beach.")
    write_text(root / ".hidden.txt", "never listed")
    write_text(root / "sub" / "deep.txt", "A text in a sub-folder.")
    write_png(root / "index" / "not_data.png", (0, 255, 0))
    return root


def test_flat_dir_tells_images_from_texts_by_content_not_extension(flat):
    found = outcomes(flat)
    assert found == {
        "actually_an_image.txt": "image",
        "caption.txt": "text",
        "looks_like.jpg": "text",
        "red.png": "image",
    }
    assert list(found) == sorted(found), "items come in name order"


def test_flat_dir_recursive_reads_sub_folders_with_posix_paths_but_never_the_index(flat):
    found = outcomes(flat, recursive=True, exclude=[flat / "index"])
    assert found == {
        "actually_an_image.txt": "image",
        "caption.txt": "text",
        "looks_like.jpg": "text",
        "red.png": "image",
        "sub/deep.txt": "text",
    }
    assert "index/not_data.png" in outcomes(flat, recursive=True), "only the excluded folder is left out"


def test_index_reached_through_a_symlink_is_still_excluded(flat):
    (flat / "link_to_index").symlink_to(flat / "index")
    found = outcomes(flat, recursive=True, exclude=[flat / "index"])
    assert not any(p.startswith(("index", "link_to_index")) for p in found)


def test_count_matches_what_scan_yields(flat):
    for recursive in (False, True):
        assert readers.count(flat, recursive=recursive, exclude=[flat / "index"]) == len(
            list(scan(flat, recursive=recursive, exclude=[flat / "index"]))
        )


def test_load_item_decodes_rgb_images_and_texts_with_size_mtime_and_hash(flat):
    items = {i.path: i for i in scan(flat) if isinstance(i, Item)}
    image = load_item(items["red.png"])
    assert image.kind == "image" and image.texts == []
    assert [(im.mode, im.size, im.getpixel((0, 0))) for im in image.images] == [
        ("RGB", (32, 24), (255, 0, 0))
    ]
    assert image.size == (flat / "red.png").stat().st_size
    assert image.mtime == (flat / "red.png").stat().st_mtime
    text = load_item(items["looks_like.jpg"])
    assert text.kind == "text" and text.images == []
    assert text.texts == ["Two children play football on a beach."]
    assert text.snippet == "Two children play football on a beach."
    assert len(image.content_hash) == 32 and image.content_hash != text.content_hash


def test_content_hash_follows_the_bytes_not_the_name(tmp_path):
    a = write_text(tmp_path / "a.txt", "same words")
    b = write_text(tmp_path / "b.txt", "same words")
    c = write_text(tmp_path / "c.txt", "other words")
    h = {p.name: load_item(item_at(p)).content_hash for p in (a, b, c)}
    assert h["a.txt"] == h["b.txt"] != h["c.txt"]


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    root = tmp_path / "mixed"
    write_png(root / "both" / "img" / "1.png", (255, 0, 0))
    write_png(root / "both" / "img" / "2.png", (250, 10, 0))
    write_text(root / "both" / "text" / "a.txt", "A red square.")
    write_png(root / "only image" / "img" / "x.png", (0, 0, 255))
    write_text(root / "only_text" / "text" / "t.txt", "Just words here.")
    (root / "empty_item" / "img").mkdir(parents=True)
    write_text(root / "loose.txt", "a file where an item folder should be")
    write_png(root / "index" / "not_data.png", (0, 255, 0))
    return root


@pytest.mark.parametrize("layout", ["mixed_dir", "simple_dir"])
def test_mixed_dir_reads_one_item_per_folder_under_both_names(mixed, layout):
    found = outcomes(mixed, layout=layout, exclude=[mixed / "index"])
    assert found == {
        "both": "mixed",
        "empty_item": "skipped: no files in img/ or text/",
        "loose.txt": "skipped: not an item folder (mixed_dir wants a sub-folder per item with img/, text/)",
        "only image": "image",
        "only_text": "text",
    }


def test_mixed_item_loads_all_its_parts(mixed):
    item = next(i for i in scan(mixed, layout="mixed_dir") if i.path == "both")
    assert [p.name for p in item.files] == ["1.png", "2.png", "a.txt"]
    loaded = load_item(item)
    assert loaded.kind == "mixed"
    assert [im.getpixel((0, 0)) for im in loaded.images] == [(255, 0, 0), (250, 10, 0)]
    assert loaded.texts == ["A red square."]
    assert loaded.size == sum(p.stat().st_size for p in item.files)


def test_a_bad_part_is_reported_but_the_rest_of_the_item_is_kept(mixed):
    (mixed / "both" / "img" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    item = next(i for i in scan(mixed, layout="mixed_dir") if i.path == "both")
    loaded = load_item(item)
    assert len(loaded.images) == 2 and loaded.texts == ["A red square."]
    assert [s.path for s in loaded.skipped] == ["both/img/3.png"]
    assert loaded.skipped[0].reason == "not a recognised image format"


def test_an_item_with_no_readable_part_raises_unreadable(tmp_path):
    (tmp_path / "bad" / "img").mkdir(parents=True)
    (tmp_path / "bad" / "img" / "x.png").write_bytes(b"not an image at all")
    item = item_at(tmp_path / "bad")
    with pytest.raises(UnreadableItemError, match=r"^not a recognised image format$"):
        load_item(item)


def test_item_at_reads_a_query_file_or_item_folder(mixed, flat):
    assert item_at(flat / "red.png").kind == "image"
    assert item_at(flat / "looks_like.jpg").kind == "text"
    assert item_at(mixed / "both").kind == "mixed"
    with pytest.raises(UnreadableItemError, match=r"does-not-exist\.png: no such file or folder$"):
        item_at(flat / "does-not-exist.png")
    with pytest.raises(UnreadableItemError, match="no files in img/ or text/"):
        item_at(mixed / "empty_item")


def test_missing_or_non_folder_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        scan(tmp_path / "nope")
    write_text(tmp_path / "file.txt", "x")
    with pytest.raises(DatasetNotFoundError, match="is not a folder"):
        scan(tmp_path / "file.txt")


def test_unknown_layout_is_refused(tmp_path):
    with pytest.raises(ValueError, match="flat_dir, mixed_dir, simple_dir"):
        scan(tmp_path, layout="zip_dir")


def test_flickr_images_are_read_as_224_pixel_rgb_images(flickr_dir, tmp_path):
    names = sorted(p.name for p in (flickr_dir / "images").iterdir())[:3]
    for name in names:
        shutil.copy(flickr_dir / "images" / name, tmp_path / name)
    entries = list(scan(tmp_path))
    assert [(e.path, e.kind) for e in entries] == [(n, "image") for n in names]
    for entry in entries:
        assert isinstance(entry, Item) and not isinstance(entry, Skipped)
        (image,) = load_item(entry).images
        assert (image.mode, image.size) == ("RGB", (224, 224))
