"""Search: rank an index by text, image, item or text+image, and walk from neighbour to neighbour."""

import hashlib
import io
from pathlib import Path

import streamlit as st
from PIL import Image
from streamlit.runtime.uploaded_file_manager import UploadedFile
from streamlit_image_select import image_select

from pages.common import (
    DEMO_INDEX,
    ViewParams,
    build_demo_index,
    get_index,
    get_searcher,
    list_indexes,
    read_view_params,
    results_csv,
    show_error,
    thumbnail,
    write_view_params,
)
from visions_core.encoders import load_image
from visions_core.errors import IndexMismatchError, VisionsError

MODES = ["Text", "Image", "Index item", "Text + image"]
COLUMNS = 4
MAX_TRAIL = 50
MAX_ITEM_CHOICES = 5000
GALLERY_SIZE = 24

st.title("Search")
indexes = {info.name: info for info in list_indexes()}
if not indexes:
    st.info("No index yet: build the demo on Home, or your own on Build index.")
    st.page_link("pages/home.py", label="Home", icon=":material/home:")
    st.stop()


# -- the walk: a trail of queries, the last one is current -------------------------------------------------


def push(query: dict) -> None:
    """Make query the current one, extending the trail (a repeat of the current query is ignored)."""
    trail = st.session_state.trail
    if not trail or trail[-1] != query:
        trail.append(query)
        del trail[:-MAX_TRAIL]


def back() -> None:
    """Return to the previous query."""
    st.session_state.trail.pop()


def jump(position: int) -> None:
    """Return to an earlier query of the trail, forgetting the ones after it."""
    del st.session_state.trail[position + 1 :]


def first_image(path: Path) -> Path | None:
    """The image to show for an item: the file itself, or the first file in a mixed item's img/ folder."""
    if path.is_file():
        return path
    images = sorted(p for p in (path / "img").glob("*") if p.is_file()) if path.is_dir() else []
    return images[0] if images else None


def picture_gallery(records: list) -> list[tuple[int, str, Image.Image]]:
    """Up to GALLERY_SIZE (id, caption, thumbnail) of the index's image and mixed items, for image_select."""
    index = get_index(name)
    gallery = []
    for record in records:
        if record["kind"] == "text" or len(gallery) == GALLERY_SIZE:
            continue
        image = first_image(index.resolve(record["path"]))
        data = thumbnail(str(image), image.stat().st_mtime) if image is not None else None
        if data is not None:
            gallery.append((record["id"], record["path"], Image.open(io.BytesIO(data))))
    return gallery


def label(query: dict) -> str:
    """A short name for a query, for the breadcrumb trail."""
    if query["kind"] == "item":
        try:
            return get_index(st.session_state.trail_index).get_record(query["item"])["path"]
        except VisionsError:
            return f"item {query['item']}"
    if query["kind"] == "text":
        return f"“{query['text'][:40]}”"
    if query["kind"] == "image":
        return f"image {query['name']}"
    return f"“{query['text'][:25]}” + image {query['name']}"


def view_of(query: dict | None) -> ViewParams:
    """The URL parameters that reproduce a query (uploaded images cannot travel in a URL)."""
    base = {"index": st.session_state.index_select, "n": st.session_state.top_n}
    if query and query["kind"] == "item":
        return ViewParams(item=query["item"], **base)
    if query and query["kind"] == "text":
        return ViewParams(q=query["text"], **base)
    return ViewParams(**base)


def remember_image(upload: UploadedFile) -> tuple[str, str]:
    """Keep an uploaded query image in the session (by content hash) so the trail can return to it."""
    data = upload.getvalue()
    key = hashlib.blake2b(data, digest_size=8).hexdigest()
    in_trail = {q.get("key") for q in st.session_state.trail}
    images = st.session_state.query_images
    for old in [k for k in images if k not in in_trail]:
        del images[old]
    images[key] = data
    return key, upload.name


# -- the URL decides the view when it was changed from outside (a shared link, a fresh tab) ------------------

view = read_view_params()
# Streamlit forgets widget values while another page is shown; "search_kept" brings them back.
for key, value in st.session_state.get("search_kept", {}).items():
    st.session_state.setdefault(key, value)
if st.session_state.get("index_select") not in indexes:
    st.session_state.index_select = next(iter(indexes))
st.session_state.setdefault("top_n", 12)
if dict(st.query_params) != st.session_state.get("url_written"):
    if view.index is not None and view.index not in indexes:
        st.error(f"No index called {view.index!r}; showing another one.")
    elif view.index is not None:
        st.session_state.index_select = view.index
    if view.n is not None:
        st.session_state.top_n = max(1, min(100, view.n))
    if st.session_state.trail_index != st.session_state.index_select:
        st.session_state.trail = []
        st.session_state.trail_index = st.session_state.index_select
    if view.item is not None:
        push({"kind": "item", "item": view.item})
    elif view.q:
        push({"kind": "text", "text": view.q})
        st.session_state.query_text = view.q

top = st.columns([3, 1])
name = top[0].selectbox(
    "Index", list(indexes), key="index_select", format_func=lambda n: f"{n} ({indexes[n].items} items)"
)
top_n = top[1].slider("Results", 1, 100, key="top_n")
st.session_state.search_kept = {"index_select": name, "top_n": top_n}
if st.session_state.trail_index != name:
    st.session_state.trail = []
    st.session_state.trail_index = name

# -- query input ---------------------------------------------------------------------------------------------

mode = st.radio("Query by", MODES, horizontal=True, key="query_mode")
if mode == "Text":
    with st.form("text_form", border=False):
        text = st.text_input("Describe what you are looking for", key="query_text")
        if st.form_submit_button("Search", key="run_text", icon=":material/search:"):
            if text.strip():
                push({"kind": "text", "text": text.strip()})
            else:
                st.warning("Type something to search for.")
elif mode == "Image":
    with st.form("image_form", border=False):
        upload = st.file_uploader("An image to find neighbours of", type=None, key="query_image")
        if st.form_submit_button("Search with this image", key="run_image", icon=":material/image_search:"):
            if upload is None:
                st.warning("Choose an image first.")
            else:
                key, image_name = remember_image(upload)
                push({"kind": "image", "key": key, "name": image_name})
elif mode == "Index item":
    records = get_index(name).records(limit=MAX_ITEM_CHOICES)
    gallery = picture_gallery(records)
    if gallery:
        picked = image_select(
            "Click a picture to explore from it",
            images=[image for _, _, image in gallery],
            captions=[caption for _, caption, _ in gallery],
            index=0,
            return_value="index",
            key=f"gallery_{name}",
        )
        # The component always reports a selection (the first, before any click): act only on a change.
        if picked != st.session_state.gallery_last.get(name, 0):
            st.session_state.gallery_last[name] = picked
            push({"kind": "item", "item": gallery[picked][0]})
    choices = {r["id"]: f"{r['path']} ({r['kind']})" for r in records}
    with st.form("item_form", border=False):
        choice = st.selectbox(
            "An item of the index", list(choices), key="query_item", format_func=choices.get
        )
        if len(choices) == MAX_ITEM_CHOICES:
            st.caption(f"The first {MAX_ITEM_CHOICES} items; open any other with ?item=ID in the URL.")
        if (
            st.form_submit_button("Find its neighbours", key="run_item", icon=":material/hub:")
            and choice is not None
        ):
            push({"kind": "item", "item": int(choice)})
else:
    with st.form("mixed_form", border=False):
        text = st.text_input("Text", key="query_mixed_text")
        upload = st.file_uploader("Image", key="query_mixed_image")
        if st.form_submit_button("Search with both", key="run_mixed", icon=":material/join:"):
            if upload is None or not text.strip():
                st.warning("Give both a text and an image.")
            else:
                key, image_name = remember_image(upload)
                push({"kind": "text+image", "text": text.strip(), "key": key, "name": image_name})

# -- the trail -----------------------------------------------------------------------------------------------

trail = st.session_state.trail
if trail:
    crumbs = st.columns([1] + [2] * min(len(trail), 6), vertical_alignment="center")
    crumbs[0].button("Back", key="back", icon=":material/arrow_back:", on_click=back, disabled=len(trail) < 2)
    shown = list(enumerate(trail))[-6:]
    for col, (position, query) in zip(crumbs[1:], shown, strict=True):
        current = position == len(trail) - 1
        col.button(
            label(query),
            key=f"crumb_{position}",
            on_click=jump,
            args=(position,),
            disabled=current,
            type="primary" if current else "secondary",
            width="stretch",
        )

# -- results -------------------------------------------------------------------------------------------------


def run(query: dict, n: int) -> list:
    """Rank the index against a query."""
    searcher = get_searcher(name)
    if query["kind"] == "text":
        return searcher.by_text(query["text"], n=n)
    if query["kind"] == "item":
        return searcher.by_item(query["item"], n=n, exclude_self=True)
    image = load_image(st.session_state.query_images[query["key"]])
    if query["kind"] == "image":
        return searcher.by_image(image, n=n)
    return searcher.by_text_and_image(query["text"], image, n=n)


def show_item(item_id: int, kind: str, path: str, caption: str, *, side_by_side: bool = False) -> None:
    """One card: a thumbnail for images, a snippet for texts, and the caption."""
    index = get_index(name)
    picture, words = st.columns([1, 3]) if side_by_side else (st.container(), st.container())
    if kind in ("image", "mixed"):
        image = first_image(index.resolve(path))
        data = thumbnail(str(image), image.stat().st_mtime) if image is not None else None
        if data is None:
            picture.caption("(image not available)")
        else:
            picture.image(data, width="stretch")
    if kind in ("text", "mixed"):
        snippet = index.get_record(item_id)["snippet"] or ""
        words.markdown(f"> {snippet[:220]}{'…' if len(snippet) > 220 else ''}")
    words.caption(caption)


def show_grid(cards: list[tuple[int, str, str, str]]) -> None:
    """Item cards (id, kind, path, caption) in rows; each has a button that makes it the next query."""
    for position, (item_id, kind, path, caption) in enumerate(cards):
        if position % COLUMNS == 0:
            cols = st.columns(COLUMNS)
        with cols[position % COLUMNS].container(border=True):
            show_item(item_id, kind, path, caption)
            st.button(
                "Explore from here",
                key=f"go_{item_id}",
                icon=":material/hub:",
                width="stretch",
                on_click=push,
                args=({"kind": "item", "item": item_id},),
            )


if not trail:
    st.info("Type a text, upload an image or pick an item to start; click any result to continue from it.")
    if samples := get_index(name).records(limit=COLUMNS * 2):
        st.subheader("Or start from one of these")
        show_grid([(r["id"], r["kind"], r["path"], r["path"]) for r in samples])
else:
    query = trail[-1]
    try:
        if query["kind"] == "item":
            record = get_index(name).get_record(query["item"])
            with st.container(border=True):
                caption = f"Current query: {record['path']} ({record['kind']})"
                show_item(record["id"], record["kind"], record["path"], caption, side_by_side=True)
        results = run(query, top_n)
    except IndexMismatchError as exc:
        show_error(exc)
        results = None
        if name == DEMO_INDEX:
            if st.button("Rebuild the demo index with the current model", key="rebuild_demo"):
                try:
                    build_demo_index()
                except VisionsError as build_error:
                    show_error(build_error)
                else:
                    st.rerun()
        else:
            st.info("Rebuild this index on **Build index** (mode: Rebuild from scratch) to search it again.")
    except VisionsError as exc:
        show_error(exc)
        results = None
    if results is not None and not results:
        st.info("No results: the index is empty.")
    elif results:
        st.subheader(f"{len(results)} nearest to {label(query)}")
        captions = [f"#{rank} · score {h.score:.3f} · {h.path}" for rank, h in enumerate(results, 1)]
        show_grid([(h.id, h.kind, h.path, c) for h, c in zip(results, captions, strict=True)])
        st.download_button(
            "Download results (CSV)",
            results_csv(get_index(name), results),
            file_name=f"visions-{name}.csv",
            mime="text/csv",
            key="export_csv",
            icon=":material/download:",
            on_click="ignore",
        )

write_view_params(view_of(trail[-1] if trail else None))
st.session_state.url_written = dict(st.query_params)
