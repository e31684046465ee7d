"""VISIONS app entry point (`streamlit run streamlit_app.py`): routes the pages, draws the shared sidebar."""

import streamlit as st

from pages.common import data_dir, init_state, kinds_label, list_indexes

st.set_page_config(page_title="VISIONS", page_icon=":material/travel_explore:", layout="wide")
init_state()

PAGES = [
    st.Page("pages/home.py", title="Home", icon=":material/home:", url_path="home", default=True),
    st.Page("pages/build.py", title="Build index", icon=":material/construction:", url_path="build"),
    st.Page("pages/search.py", title="Search", icon=":material/search:", url_path="search"),
]
page = st.navigation(PAGES)

with st.sidebar:
    st.caption("Indexes")
    indexes = list_indexes()
    for info in indexes:
        st.markdown(f"**{info.name}** · {info.items} items  \n{kinds_label(info.kinds)}")
    if not indexes:
        st.markdown("No index yet: try the demo on Home or build one.")
    st.caption(f"Data folder: `{data_dir()}`")

page.run()
