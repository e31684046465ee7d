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
    st.dataframe(table, hide_index=True, width="stretch", key="index_table")
else:
    st.info("No index yet. Try the demo dataset above, or build one from your own files on **Build index**.")


def card_rows(card: dict, prefix: str = "") -> list[dict[str, str]]:
    """Flatten the model card into (field, value) rows for a compact table."""
    rows: list[dict[str, str]] = []
    for key, value in card.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += card_rows(value, f"{name}.")
        elif isinstance(value, list | tuple):
            rows.append({"field": name, "value": ", ".join(map(str, value))})
        else:
            rows.append({"field": name, "value": str(value)})
    return rows


st.subheader("Model")
try:
    embedder = get_embedder()
except VisionsError as exc:
    show_error(exc)
else:
    st.markdown(f"Aligner **{embedder.aligner_id}**, {embedder.dim}-dimensional shared space.")
    with st.expander("Model card", expanded=False):
        st.dataframe(pd.DataFrame(card_rows(embedder.card)), hide_index=True, width="stretch")
