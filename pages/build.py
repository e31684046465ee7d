"""Build index: from uploaded files (or one zip) or from a folder under the configured data roots."""

import shutil
from pathlib import Path

import streamlit as st

from pages.common import (
    data_dir,
    data_roots,
    index_path,
    indexes_dir,
    run_build,
    show_error,
    show_report,
    upload_limits,
)
from visions_core.errors import IndexExistsError, VisionsError
from visions_core.index import DEFAULT_BUCKET_SIZE, FlatIndex
from visions_core.uploads import (
    check_folder,
    confine,
    dataset_root,
    extract_zip,
    list_folders,
    new_upload_dir,
    safe_name,
    save_uploads,
)

UPLOAD, FOLDER = "Upload files", "Folder on the server"
MODES = {"create": "New index", "append": "Append new files", "rebuild": "Rebuild from scratch"}
ROOT_FOLDER = "(the root itself)"

st.title("Build an index")
limits = upload_limits()
source = st.radio("Source", [UPLOAD, FOLDER], horizontal=True, key="source")

if source == UPLOAD:
    files = st.file_uploader(
        "Images and texts, or one .zip of a dataset (either layout)",
        accept_multiple_files=True,
        key="upload_files",
        help=f"At most {limits.max_files} files and {limits.max_upload_bytes // 2**20} MB per upload.",
    )
    default_name = Path(files[0].name).stem if files and len(files) == 1 else "upload"
else:
    roots = data_roots()
    root = Path(st.selectbox("Data root", [str(r) for r in roots], key="root"))
    stored = indexes_dir().resolve()
    found = list_folders(root) if root.is_dir() else []
    folders = [ROOT_FOLDER, *(f for f in found if not (root / f).resolve().is_relative_to(stored))]
    picked = st.selectbox("Folder", folders, key="folder")
    typed = st.text_input("…or a path relative to the root", key="folder_text").strip()
    relative = typed or ("" if picked == ROOT_FOLDER else picked)
    default_name = Path(relative).name or root.name

cols = st.columns(4)
layout = cols[0].selectbox(
    "Layout",
    ["flat_dir", "mixed_dir"],
    key="layout",
    help="flat_dir: every file is an item. mixed_dir: one sub-folder per item with img/ and text/ inside.",
)
recursive = cols[1].checkbox("Include sub-folders", key="recursive", help="flat_dir only")
bucket_size = cols[2].number_input(
    "Bucket size (rows)", min_value=1, value=DEFAULT_BUCKET_SIZE, step=1024, key="bucket_size"
)
mode = cols[3].radio("Mode", list(MODES), format_func=MODES.get, key="mode")
name = safe_name(st.text_input("Index name", value=default_name, key="index_name"), max_length=60)
st.caption(f"The index is stored in `{index_path(name)}`.")


def upload_folder_of(existing: Path) -> Path:
    """The upload folder an existing index was built from; appending uploads anywhere else is refused."""
    with FlatIndex.open(existing) as index:
        root = index.data_root
    uploads = data_dir() / "uploads"
    if not root.resolve().is_relative_to(uploads.resolve()):
        raise VisionsError(f"index {name!r} was built from a server folder; append to it from that folder")
    return root


def prepare_upload() -> Path:
    """Save the uploaded files (or unpack the zip) into a folder of their own and return the dataset root."""
    if not files:
        raise VisionsError("choose some files to upload first")
    zips = [f for f in files if f.name.lower().endswith(".zip")]
    if zips and len(files) > 1:
        raise VisionsError("upload either one .zip or separate files, not both")
    size = sum(f.size for f in files)
    if size > limits.max_upload_bytes:
        raise VisionsError(
            f"the upload is {size / 2**20:.1f} MB; the limit is {limits.max_upload_bytes / 2**20:.0f} MB"
        )
    if mode == "append" and FlatIndex.exists(index_path(name)):
        if zips:
            raise VisionsError("a zip makes a new dataset: build it as a new index or rebuild this one")
        folder = upload_folder_of(index_path(name))
        save_uploads(((f.name, f) for f in files), folder, limits)
        return folder
    folder = new_upload_dir(data_dir(), name)
    try:
        if zips:
            extract_zip(zips[0], folder, limits)
            return dataset_root(folder)
        save_uploads(((f.name, f) for f in files), folder, limits)
        return folder
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


if st.button("Build index", type="primary", icon=":material/construction:", key="build"):
    try:
        if mode == "create" and FlatIndex.exists(index_path(name)):
            raise IndexExistsError(f"an index called {name!r} exists: choose Append or Rebuild, or rename")
        if source == UPLOAD:
            folder = prepare_upload()
        else:
            folder = confine(root, relative)
            if not folder.is_dir():
                raise VisionsError(f"{relative or root} is not a folder under {root}")
            if folder.is_relative_to(indexes_dir().resolve()):
                raise VisionsError("that folder holds the app's indexes, not a dataset")
            check_folder(folder, root, limit=limits.max_files)
        st.caption(f"Indexing `{folder}`")
        run_build(folder, name, layout=layout, recursive=recursive, bucket_size=int(bucket_size), mode=mode)
    except VisionsError as exc:
        show_error(exc)

last = st.session_state.get("last_report")
if last is not None:
    st.subheader(f"Last build: {last['name']}")
    show_report(last["report"])
    st.page_link(
        "pages/search.py",
        label=f"Search {last['name']}",
        icon=":material/search:",
        query_params={"index": last["name"]},
    )
