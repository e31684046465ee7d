"""Home: what VISIONS does, the indexes available, the model card, and a one-click demo."""

import pandas as pd
import streamlit as st

from pages.common import (
    DEMO_INDEX,
    build_demo_index,
    get_embedder,
    kinds_label,
    list_indexes,
    show_error,
    show_report,
)
from visions_core.errors import VisionsError

st.title("VISIONS")
st.markdown(
    "Puts images and texts into **one visual-semantic space**, so a caption sits next to its photo.  \n"
    "Index any folder, rank it by a text, an image or one of its items, and walk from neighbour to neighbour."
)

if st.button("Try the demo dataset", type="primary", icon=":material/rocket_launch:", key="try_demo"):
    try:
        with st.status("Preparing the demo index…", expanded=True):
            report = build_demo_index()
            show_report(report)
    except VisionsError as exc:
        show_error(exc)
    else:
        st.switch_page("pages/search.py", query_params={"index": DEMO_INDEX})

st.subheader("Indexes")
indexes = list_indexes()
if indexes:
    table = pd.DataFrame(
        [
            {"index": i.name, "items": i.items, "kinds": kinds_label(i.kinds), "data folder": i.data_root}
            for i in indexes
        ]
    )
    st.dataframe(table, hide_index=True, width="stretch")
else:
    st.info("No index yet. Try the demo dataset above, or build one from your own files on **Build index**.")


def describe(value: object) -> str:
    """A compact one-line rendering of a model card entry."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {describe(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(map(describe, value))
    return str(value)


def quality_table(card: dict) -> pd.DataFrame | None:
    """Dev-split recall at 1/5/10 in both directions, when the card records them."""
    dev = card.get("dev")
    names = {"i2t": "image → text", "t2i": "text → image"}
    if not isinstance(dev, dict):
        return None
    rows = [
        {"direction": names[d], **{f"R@{k[1:]}": dev[d].get(k) for k in ("r1", "r5", "r10")}}
        for d in names
        if isinstance(dev.get(d), dict)
    ]
    return pd.DataFrame(rows) if rows else None


st.subheader("Model")
try:
    embedder = get_embedder()
except VisionsError as exc:
    show_error(exc)
else:
    card = embedder.card
    st.markdown(f"Aligner **{embedder.aligner_id}**, {embedder.dim}-dimensional shared space.")
    for key, title in (("encoders", "Encoders"), ("data", "Trained on"), ("date", "Date")):
        if key in card:
            st.markdown(f"**{title}:** {describe(card[key])}")
    quality = quality_table(card)
    if quality is not None:
        st.caption("Retrieval quality on the Flickr8k dev split (recall, %)")
        st.dataframe(quality, hide_index=True)
    with st.expander("Full model card"):
        st.json(card, expanded=False)
