"""Untrusted uploads: safe names, archives that cannot escape or explode, folders kept under data roots."""

import io
import os
import stat
import struct
import zipfile
from pathlib import Path

import pytest

from visions_core.errors import UnsafePathError, VisionsError
from visions_core.uploads import (
    UploadLimitError,
    UploadLimits,
    check_folder,
    confine,
    confine_to_roots,
    dataset_root,
    extract_zip,
    list_folders,
    new_upload_dir,
    parse_roots,
    safe_name,
    safe_relpath,
    save_uploads,
)

LIMITS = UploadLimits(max_upload_bytes=10_000, max_extracted_bytes=10_000, max_files=5)


def make_zip(members: dict[str, bytes], *, links: dict[str, str] | None = None) -> bytes:
    """A zip in memory; `links` become symbolic-link members (as Info-ZIP stores them)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return buf.getvalue()


def tree(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("photo.jpg", "photo.jpg"),
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\ann\\holiday 1.JPG", "holiday 1.JPG"),
        ("line\nbreak.txt", "line_break.txt"),
        ("..", "file"),
        ("", "file"),
        (".bashrc", "bashrc"),
        ("con.txt", "_con.txt"),
        ("naïve café 日本.png", "naïve café 日本.png"),
        ("\u202egnp.exe", "_gnp.exe"),
        ("a<b>|c?.txt", "a_b__c_.txt"),
    ],
)
def test_safe_name_reduces_any_name_to_one_harmless_component(raw, expected):
    assert safe_name(raw) == expected


def test_safe_name_keeps_the_extension_when_shortening():
    name = safe_name("x" * 500 + ".jpeg", max_length=50)
    assert len(name) == 50 and name.endswith(".jpeg")


@pytest.mark.parametrize(
    "member",
    ["/etc/passwd", "C:/win.ini", "c:\\evil.txt", "../up.txt", "a/../../up.txt", "a\\..\\..\\up", "x\x00y"],
)
def test_safe_relpath_refuses_absolute_and_parent_paths(member):
    with pytest.raises(UnsafePathError, match="refused"):
        safe_relpath(member)


def test_safe_relpath_sanitises_every_component():
    assert safe_relpath("./cats/img/tabby cat\t1.jpg").as_posix() == "cats/img/tabby cat_1.jpg"


def test_new_upload_dirs_are_distinct_folders_under_uploads(tmp_path):
    a, b = new_upload_dir(tmp_path, "../my set"), new_upload_dir(tmp_path, "../my set")
    assert a != b and a.parent == b.parent == tmp_path / "uploads"
    assert ".." not in a.name and "/" not in a.name


def test_saved_uploads_land_in_their_own_folder_under_safe_unique_names(tmp_path):
    dest = new_upload_dir(tmp_path)
    files = [("../../evil.txt", b"a"), ("/abs/evil.txt", b"b"), ("evil.txt", b"c"), ("ok image.jpg", b"d")]
    saved = save_uploads(((n, io.BytesIO(d)) for n, d in files), dest, LIMITS)
    assert tree(dest) == ["evil-1.txt", "evil-2.txt", "evil.txt", "ok image.jpg"]
    assert [p.read_bytes() for p in saved] == [b"a", b"b", b"c", b"d"]
    assert all(p.parent == dest for p in saved)
    assert not (tmp_path / "evil.txt").exists()


def test_uploads_over_the_size_limit_are_refused_and_removed(tmp_path):
    dest = new_upload_dir(tmp_path)
    files = [("a.txt", io.BytesIO(b"x" * 6000)), ("b.txt", io.BytesIO(b"y" * 6000))]
    with pytest.raises(UploadLimitError, match=r"larger than the limit of 0\.0 MB"):
        save_uploads(files, dest, LIMITS)
    assert tree(dest) == []


def test_a_refused_upload_into_an_existing_folder_keeps_the_earlier_files(tmp_path):
    dest = new_upload_dir(tmp_path)
    save_uploads([("first.txt", io.BytesIO(b"kept"))], dest, LIMITS)
    with pytest.raises(UploadLimitError):
        save_uploads([("a.txt", io.BytesIO(b"x")), ("big.txt", io.BytesIO(b"y" * 20_000))], dest, LIMITS)
    assert tree(dest) == ["first.txt"]


def test_a_zip_is_only_unpacked_into_an_empty_folder(tmp_path):
    (tmp_path / "old.txt").write_text("old")
    with pytest.raises(VisionsError, match="not empty"):
        extract_zip(io.BytesIO(make_zip({"a.txt": b"a"})), tmp_path, LIMITS)
    assert tree(tmp_path) == ["old.txt"]


def test_uploads_over_the_file_count_limit_are_refused(tmp_path):
    dest = new_upload_dir(tmp_path)
    files = [(f"{i}.txt", io.BytesIO(b"t")) for i in range(6)]
    with pytest.raises(UploadLimitError, match="too many files: the limit is 5"):
        save_uploads(files, dest, LIMITS)
    assert tree(dest) == []


@pytest.mark.parametrize("layout", ["flat", "mixed"])
def test_a_clean_zip_extracts_in_either_layout(tmp_path, layout):
    members = (
        {"set/a.txt": b"a cat", "set/b.txt": b"a dog", "__MACOSX/set/._a.txt": b"junk"}
        if layout == "flat"
        else {"cat/img/c.png": b"png", "cat/text/c.txt": b"a cat", "dog/text/d.txt": b"a dog"}
    )
    written = extract_zip(io.BytesIO(make_zip(members)), tmp_path, LIMITS)
    real = {k: v for k, v in members.items() if "__MACOSX" not in k}
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == sorted(real)
    root = dataset_root(tmp_path)
    assert root == (tmp_path / "set" if layout == "flat" else tmp_path)


@pytest.mark.parametrize(
    ("members", "links", "message"),
    [
        ({"/etc/cron.d/evil": b"x"}, None, "absolute paths are not allowed"),
        ({"ok.txt": b"x", "../../escape.txt": b"x"}, None, "'..' would escape"),
        ({"ok.txt": b"x", "a\\..\\..\\escape.txt": b"x"}, None, "'..' would escape"),
        ({"ok.txt": b"x"}, {"link.txt": "/etc/passwd"}, "symbolic links"),
        ({"ok.txt": b"x"}, {"dir": "../../"}, "symbolic links"),
        ({f"{i}.txt": b"x" for i in range(6)}, None, "more than 5 files"),
        ({"zeros.txt": b"\0" * 50_000}, None, "would unpack to more than"),
    ],
    ids=["absolute", "dotdot", "backslash-dotdot", "file-link", "dir-link", "too-many", "bomb"],
)
def test_a_hostile_zip_is_refused_and_leaves_nothing_behind(tmp_path, members, links, message):
    with pytest.raises(VisionsError, match=message):
        extract_zip(io.BytesIO(make_zip(members, links=links)), tmp_path, LIMITS)
    assert tree(tmp_path) == []
    assert not (tmp_path.parent / "escape.txt").exists()


def test_a_zip_bomb_that_understates_its_size_is_caught_while_inflating(tmp_path):
    data = bytearray(make_zip({"zeros.txt": b"\0" * 200_000}))
    # Forge the central directory's uncompressed size (offset 24 in the entry) down to 10 bytes.
    entry = data.index(b"PK\x01\x02")
    struct.pack_into("<I", data, entry + 24, 10)
    limits = UploadLimits(max_extracted_bytes=1_000, max_files=5)
    with pytest.raises(VisionsError, match=r"damaged|more than"):
        extract_zip(io.BytesIO(bytes(data)), tmp_path, limits)
    assert tree(tmp_path) == []


def test_a_real_compression_bomb_is_stopped_at_the_byte_budget(tmp_path):
    data = make_zip({"zeros.bin": b"\0" * 2_000_000})
    assert len(data) < 10_000  # high compression ratio: the bomb is small on the wire
    with pytest.raises(UploadLimitError, match=r"more than 0\.0 MB"):
        extract_zip(io.BytesIO(data), tmp_path, UploadLimits(max_extracted_bytes=50_000))
    assert tree(tmp_path) == []


def test_a_file_that_is_not_a_zip_is_a_clear_error(tmp_path):
    with pytest.raises(VisionsError, match="not a readable zip"):
        extract_zip(io.BytesIO(b"definitely not a zip"), tmp_path, LIMITS)


@pytest.fixture
def root_with_links(tmp_path):
    """A data root holding a dataset, an in-root link, an escaping link, a loop, and a secret outside."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "photos" / "cats").mkdir(parents=True)
    (root / ".hidden").mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    (root / "inside_link").symlink_to(root / "photos")
    (root / "escape_link").symlink_to(outside)
    (root / "loop").symlink_to(root / "loop")
    return root, outside


def test_folders_resolve_relative_to_their_root(root_with_links):
    root, _ = root_with_links
    assert confine(root, "photos/cats") == (root / "photos" / "cats").resolve()
    assert confine(root, "") == root.resolve()
    assert confine(root, "inside_link") == (root / "photos").resolve()


@pytest.mark.parametrize(
    ("user_path", "message"),
    [
        ("/etc", "not absolute"),
        ("../outside", "'..' is not allowed"),
        ("photos/../../outside", "'..' is not allowed"),
        ("escape_link", "outside the data root"),
        ("escape_link/", "outside the data root"),
        ("loop", "refused"),
        ("pho\x00tos", "NUL"),
    ],
)
def test_each_escape_from_a_data_root_is_refused_with_a_message(root_with_links, user_path, message):
    root, _ = root_with_links
    with pytest.raises(UnsafePathError, match=message):
        confine(root, user_path)


def test_absolute_paths_are_accepted_only_inside_a_configured_root(root_with_links, tmp_path):
    root, outside = root_with_links
    other = tmp_path / "other_root"
    other.mkdir()
    roots = [other, root]
    assert confine_to_roots(str(root / "photos"), roots) == (root / "photos").resolve()
    assert confine_to_roots("", roots) == other.resolve()
    for bad in (str(outside), str(root / "escape_link"), "/", str(root / "photos" / ".." / "..")):
        with pytest.raises(UnsafePathError, match="refused"):
            confine_to_roots(bad, roots)
    with pytest.raises(UnsafePathError, match="no data roots"):
        confine_to_roots(str(root), [])


def test_folder_listing_skips_hidden_folders_and_every_link(root_with_links):
    root, _ = root_with_links
    assert list_folders(root) == ["photos", "photos/cats"]
    assert list_folders(root, max_depth=1) == ["photos"]


def test_data_roots_come_from_a_path_list_or_the_defaults(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert parse_roots(f"{a}{os.pathsep}{b}{os.pathsep}{a}", [tmp_path]) == [a, b]
    assert parse_roots([str(b)], [tmp_path]) == [b]
    assert parse_roots("  ", [tmp_path / "x"]) == [tmp_path / "x"]


def test_limits_are_read_from_settings_and_bad_values_are_explained():
    limits = UploadLimits.from_mapping({"VISIONS_MAX_UPLOAD_MB": "2", "VISIONS_MAX_FILES": 7})
    assert limits.max_upload_bytes == 2 * 1024 * 1024 and limits.max_files == 7
    assert limits.max_extracted_bytes == UploadLimits().max_extracted_bytes
    with pytest.raises(VisionsError, match="VISIONS_MAX_FILES must be a number"):
        UploadLimits.from_mapping({"VISIONS_MAX_FILES": "lots"})
    with pytest.raises(VisionsError, match="must be positive"):
        UploadLimits.from_mapping({"VISIONS_MAX_UPLOAD_MB": "-1"})


def test_oversized_server_folders_are_refused_before_building(tmp_path):
    (tmp_path / "sub").mkdir()
    for i in range(4):
        (tmp_path / ("sub" if i % 2 else ".") / f"{i}.txt").write_text("t")
    assert check_folder(tmp_path, tmp_path, limit=4) == 4
    with pytest.raises(UploadLimitError, match="more than 3 files"):
        check_folder(tmp_path, tmp_path, limit=3)


def test_links_inside_a_server_folder_may_not_lead_out_of_the_root(root_with_links):
    root, outside = root_with_links
    cats = root / "photos" / "cats"
    (cats / "cat.txt").write_text("a cat")
    (cats / "same_cat.txt").symlink_to(cats / "cat.txt")
    (cats / "back_up").symlink_to(root / "photos")  # a loop, but inside the root
    (cats / "gone.txt").symlink_to(root / "missing.txt")
    assert check_folder(cats, root, limit=10) == 2
    (cats / "secret.txt").symlink_to(outside / "secret.txt")
    with pytest.raises(UnsafePathError, match=r"secret\.txt is a link leading out of the data root"):
        check_folder(cats, root, limit=10)
    (cats / "secret.txt").unlink()
    (cats / "elsewhere").symlink_to(outside)
    with pytest.raises(UnsafePathError, match="elsewhere is a link"):
        check_folder(cats, root, limit=10)
