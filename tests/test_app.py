"""The Streamlit app, page by page, through AppTest with the real models and the bundled demo dataset."""

import io
import re
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from visions_core.index import FlatIndex
from visions_core.search import Searcher

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo" / "dataset"
TIMEOUT = 180


def new_app() -> AppTest:
    """The app at its Home page, after one run."""
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=TIMEOUT)
    return at.run()


def open_page(page: str, **params: str) -> AppTest:
    """The app opened on a page with URL parameters, as a shared link would open it."""
    at = new_app()
    at.query_params.update(params)
    return at.switch_page(f"pages/{page}.py").run()


def result_ids(at: AppTest) -> list[int]:
    """Ids of the result cards, in rank order (from their 'Explore from here' buttons)."""
    return [int(b.key.removeprefix("go_")) for b in at.button if b.key and b.key.startswith("go_")]


def no_failure(at: AppTest) -> None:
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]


@pytest.fixture(scope="module")
def demo_app(tmp_path_factory):
    """A data folder of its own in which the Home page's demo button has built the demo index."""
    with pytest.MonkeyPatch.context() as mp:
        data = tmp_path_factory.mktemp("app") / "data"
        mp.setenv("VISIONS_DATA_DIR", str(data))
        mp.delenv("VISIONS_DATA_ROOTS", raising=False)
        at = new_app()
        at.button(key="try_demo").click().run()
        yield at, data


@pytest.fixture
def demo_index(demo_app):
    with FlatIndex.open(demo_app[1] / "indexes" / "demo") as index:
        yield index


@pytest.fixture
def fresh_data(tmp_path, monkeypatch):
    """An empty data folder for tests that build their own indexes."""
    monkeypatch.setenv("VISIONS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("VISIONS_DATA_ROOTS", raising=False)
    return tmp_path / "data"


def test_home_without_any_index_says_how_to_start(fresh_data):
    at = new_app()
    assert not at.exception
    assert any("No index yet" in i.value for i in at.info)
    assert at.button(key="try_demo").label == "Try the demo dataset"


def test_the_demo_button_builds_the_whole_demo_and_opens_search(demo_app, demo_index):
    at, _ = demo_app
    no_failure(at)
    assert at.query_params["index"] == "demo"
    assert at.title[0].value == "Search"
    item_folders = [p for p in DEMO.iterdir() if p.is_dir()]
    assert len(demo_index) == len(item_folders)
    kinds = {r["path"]: r["kind"] for r in demo_index.records()}
    for folder in item_folders:
        has_img, has_text = (folder / "img").is_dir(), (folder / "text").is_dir()
        assert kinds[folder.name] == ("mixed" if has_img and has_text else "image" if has_img else "text")
    # AppTest keeps the entry point's sidebar only on the default page, so look at it from Home.
    sidebar = new_app().sidebar.markdown
    assert any("demo" in m.value and f"{len(item_folders)} items" in m.value for m in sidebar)


def test_the_home_page_lists_the_demo_index_and_the_model(demo_app, demo_index, embedder):
    at = new_app()
    no_failure(at)
    table = at.dataframe[0].value
    assert table.loc[0, "index"] == "demo" and table.loc[0, "items"] == len(demo_index)
    assert any(embedder.aligner_id in m.value for m in at.markdown)


def test_search_without_a_query_offers_items_to_start_from(demo_app, demo_index):
    at = open_page("search", index="demo")
    no_failure(at)
    starters = result_ids(at)
    assert starters == [r["id"] for r in demo_index.records(limit=len(starters))] and starters
    at.button(key=f"go_{starters[0]}").click().run()
    assert at.query_params["item"] == str(starters[0])
    assert starters[0] not in result_ids(at)


def test_a_text_query_ranks_the_index_like_the_engine_and_goes_into_the_url(demo_app, demo_index, embedder):
    at = open_page("search", index="demo")
    at.text_input(key="query_text").input("a tabby cat with green eyes")
    at.button(key="run_text").click().run()
    no_failure(at)
    expected = Searcher(embedder, demo_index).by_text("a tabby cat with green eyes", n=12)
    assert result_ids(at) == [r.id for r in expected]
    assert demo_index.get_record(result_ids(at)[0])["path"] in {"cat_chelsea", "kitten_on_sofa"}
    assert at.query_params["q"] == "a tabby cat with green eyes" and at.query_params["index"] == "demo"
    assert at.get("download_button")[0].proto.label == "Download results (CSV)"


def test_results_export_as_csv_with_snippets(demo_index, embedder):
    from pages.common import results_csv

    results = Searcher(embedder, demo_index).by_text("a pot of tea", n=5)
    table = pd.read_csv(io.StringIO(results_csv(demo_index, results)), keep_default_na=False)
    assert list(table.columns) == ["rank", "id", "path", "kind", "score", "snippet"]
    assert list(table["id"]) == [r.id for r in results] and list(table["rank"]) == [1, 2, 3, 4, 5]
    assert table["score"].is_monotonic_decreasing
    for row in table.itertuples():
        assert row.snippet == (demo_index.get_record(row.id)["snippet"] or "")


def test_an_item_query_lists_its_neighbours_without_itself(demo_app, demo_index, embedder):
    coffee = demo_index.get_record_by_path("coffee_cup")["id"]
    at = open_page("search", index="demo")
    at.radio(key="query_mode").set_value("Index item").run()
    at.selectbox(key="query_item").set_value(coffee)
    at.button(key="run_item").click().run()
    no_failure(at)
    expected = Searcher(embedder, demo_index).by_item(coffee, n=12, exclude_self=True)
    assert result_ids(at) == [r.id for r in expected]
    assert coffee not in result_ids(at)
    assert at.query_params["item"] == str(coffee)


def test_clicking_a_result_makes_it_the_query_and_back_returns(demo_app, demo_index, embedder):
    at = open_page("search", index="demo", q="a rocket launch")
    assert at.text_input(key="query_text").value == "a rocket launch"
    first = result_ids(at)
    clicked = first[1]
    at.button(key=f"go_{clicked}").click().run()
    no_failure(at)
    expected = Searcher(embedder, demo_index).by_item(clicked, n=12, exclude_self=True)
    assert result_ids(at) == [r.id for r in expected] != first
    assert at.query_params["item"] == str(clicked) and "q" not in at.query_params
    # The breadcrumb trail shows the walk; the current step is not clickable, the earlier one is.
    assert at.button(key="crumb_1").disabled and not at.button(key="crumb_0").disabled
    at.button(key="back").click().run()
    assert result_ids(at) == first and at.query_params["q"] == "a rocket launch"


def test_a_copied_link_restores_the_item_view_and_top_n(demo_app, demo_index, embedder):
    horse = demo_index.get_record_by_path("horse")["id"]
    at = open_page("search", index="demo", item=str(horse), n="5")
    no_failure(at)
    assert at.slider(key="top_n").value == 5
    expected = Searcher(embedder, demo_index).by_item(horse, n=5, exclude_self=True)
    assert result_ids(at) == [r.id for r in expected]
    assert any(c.value == "Current query: horse (image)" for c in at.caption)


def test_an_uploaded_image_finds_its_own_item_first(demo_app, demo_index):
    horse = demo_index.get_record_by_path("horse")["id"]
    at = open_page("search", index="demo")
    at.radio(key="query_mode").set_value("Image").run()
    at.file_uploader(key="query_image").set_value(
        ("h.jpg", (DEMO / "horse/img/horse.jpg").read_bytes(), "image/jpeg")
    )
    at.button(key="run_image").click().run()
    no_failure(at)
    assert result_ids(at)[0] == horse
    assert set(at.query_params) == {"index", "n"}


def test_text_and_image_together_rank_both_kinds(demo_app, demo_index, embedder):
    at = open_page("search", index="demo")
    at.radio(key="query_mode").set_value("Text + image").run()
    image = (DEMO / "coffee_cup/img/coffee_cup.jpg").read_bytes()
    at.text_input(key="query_mixed_text").input("a hot drink")
    at.file_uploader(key="query_mixed_image").set_value(("c.jpg", image, "image/jpeg"))
    at.button(key="run_mixed").click().run()
    no_failure(at)
    from visions_core.encoders import load_image

    expected = Searcher(embedder, demo_index).by_text_and_image("a hot drink", load_image(image), n=12)
    assert result_ids(at) == [r.id for r in expected]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"index": "nope"}, "No index called 'nope'"),
        ({"index": "demo", "item": "99999"}, "no item with id 99999"),
    ],
)
def test_bad_links_are_explained_not_tracebacks(demo_app, params, message):
    at = open_page("search", **params)
    assert not at.exception
    assert any(message in e.value for e in at.error)


def test_empty_queries_and_unreadable_images_are_messages(demo_app):
    at = open_page("search", index="demo")
    at.button(key="run_text").click().run()
    assert any("Type something" in w.value for w in at.warning)
    at.radio(key="query_mode").set_value("Image").run()
    at.file_uploader(key="query_image").set_value(("x.jpg", b"not an image at all", "image/jpeg"))
    at.button(key="run_image").click().run()
    assert not at.exception
    assert any("image" in e.value for e in at.error)


def test_search_without_an_index_is_an_empty_state(fresh_data):
    at = open_page("search")
    assert not at.exception
    assert any("No index yet" in i.value for i in at.info)


def zip_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_uploaded_files_build_an_index_and_skipped_files_are_listed(fresh_data):
    image = (DEMO / "horse/img/horse.jpg").read_bytes()
    files = [
        ("horse photo.jpg", image, "image/jpeg"),
        ("../note.txt", b"A horse in a field.", "text/plain"),
        ("empty.txt", b"", "text/plain"),
    ]
    at = open_page("build")
    at.file_uploader(key="upload_files").set_value(files)
    at.text_input(key="index_name").input("mine")
    at.button(key="build").click().run()
    no_failure(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Added"] == "2" and metrics["Skipped"] == "1"
    assert at.get("progress")[-1].proto.text.startswith("Done: 2 added")
    skipped = at.dataframe[0].value
    assert list(skipped["path"]) == ["empty.txt"]
    uploads = list((fresh_data / "uploads").iterdir())
    assert len(uploads) == 1 and sorted(p.name for p in uploads[0].iterdir()) == [
        "empty.txt",
        "horse photo.jpg",
        "note.txt",
    ]
    with FlatIndex.open(fresh_data / "indexes" / "mine") as index:
        assert sorted(r["path"] for r in index.records()) == ["horse photo.jpg", "note.txt"]


def test_more_uploads_can_be_appended_to_an_uploaded_index(fresh_data):
    at = open_page("build")
    at.file_uploader(key="upload_files").set_value([("a.txt", b"A red apple.", "text/plain")])
    at.text_input(key="index_name").input("notes")
    at.button(key="build").click().run()
    no_failure(at)
    at.file_uploader(key="upload_files").set_value([("a.txt", b"A green pear.", "text/plain")])
    at.radio(key="mode").set_value("append")
    at.button(key="build").click().run()
    no_failure(at)
    assert {m.label: m.value for m in at.metric}["Added"] == "1"
    with FlatIndex.open(fresh_data / "indexes" / "notes") as index:
        assert sorted(r["snippet"] for r in index.records()) == ["A green pear.", "A red apple."]
    assert len(list((fresh_data / "uploads").iterdir())) == 1


def test_a_zipped_mixed_dataset_builds_and_a_second_create_is_refused(fresh_data):
    members = {
        "set/cat/img/c.jpg": (DEMO / "cat_chelsea/img/cat_chelsea.jpg").read_bytes(),
        "set/cat/text/c.txt": b"A cat.",
        "set/tea/text/t.txt": b"A pot of tea.",
    }
    at = open_page("build")
    at.file_uploader(key="upload_files").set_value(("set.zip", zip_of(members), "application/zip"))
    at.selectbox(key="layout").set_value("mixed_dir")
    at.text_input(key="index_name").input("zipped")
    at.button(key="build").click().run()
    no_failure(at)
    with FlatIndex.open(fresh_data / "indexes" / "zipped") as index:
        assert {r["path"]: r["kind"] for r in index.records()} == {"cat": "mixed", "tea": "text"}
    at.button(key="build").click().run()
    assert any("exists" in e.value for e in at.error)


def test_a_hostile_zip_is_refused_and_nothing_is_kept(fresh_data):
    at = open_page("build")
    at.file_uploader(key="upload_files").set_value(
        ("x.zip", zip_of({"../../evil.txt": b"x"}), "application/zip")
    )
    at.button(key="build").click().run()
    assert not at.exception
    assert any("would escape" in e.value for e in at.error)
    assert list((fresh_data / "uploads").iterdir()) == []
    assert not (fresh_data.parent / "evil.txt").exists()


def test_upload_limits_are_enforced_with_a_message(fresh_data, monkeypatch):
    monkeypatch.setenv("VISIONS_MAX_FILES", "2")
    at = open_page("build")
    at.file_uploader(key="upload_files").set_value([(f"{i}.txt", b"text", "text/plain") for i in range(3)])
    at.button(key="build").click().run()
    assert not at.exception
    assert any("limit is 2" in e.value for e in at.error)


def test_server_folders_are_confined_to_the_data_roots(fresh_data, tmp_path, monkeypatch):
    root = tmp_path / "root"
    (root / "texts").mkdir(parents=True)
    (root / "texts" / "a.txt").write_text("A walk in the park.")
    (root / "escape").symlink_to(tmp_path)
    (root / "linked").mkdir()
    (tmp_path / "secret.txt").write_text("not for users")
    (root / "linked" / "secret.txt").symlink_to(tmp_path / "secret.txt")
    monkeypatch.setenv("VISIONS_DATA_ROOTS", str(root))
    at = open_page("build")
    at.radio(key="source").set_value("Folder on the server").run()
    assert at.selectbox(key="root").options == [str(root)]
    assert at.selectbox(key="folder").options == ["(the root itself)", "linked", "texts"]
    attempts = [
        ("../", "'..' is not allowed"),
        ("/etc", "not absolute"),
        ("escape", "outside the data root"),
        ("linked", "secret.txt is a link leading out of the data root"),
    ]
    for attempt, message in attempts:
        at.text_input(key="folder_text").input(attempt)
        at.button(key="build").click().run()
        assert not at.exception
        assert any(message in e.value for e in at.error), attempt
    at.text_input(key="folder_text").input("")
    at.selectbox(key="folder").set_value("texts")
    at.text_input(key="index_name").input("texts")
    at.button(key="build").click().run()
    no_failure(at)
    with FlatIndex.open(fresh_data / "indexes" / "texts") as index:
        assert [r["path"] for r in index.records()] == ["a.txt"]


def test_build_progress_shows_counts_rate_and_eta():
    from pages.common import progress_reporter

    class Bar:
        def progress(self, value, text):
            self.value, self.text = value, text

    bar = Bar()
    report = progress_reporter(bar)
    report(5, 20)
    assert bar.value == 0.25
    assert re.fullmatch(r"5/20 items · [\d.]+ items/s · ETA \d+ s", bar.text)
    report(0, 0)
    assert bar.value == 1.0


def test_an_index_of_other_weights_is_refused_and_the_demo_can_be_rebuilt(fresh_data, embedder):
    stale = fresh_data / "indexes" / "demo"
    with FlatIndex.create(stale, dim=embedder.dim, aligner_id="older-weights", data_root=DEMO) as index:
        vector = np.zeros((1, embedder.dim), dtype=np.float32)
        vector[0, 0] = 1.0
        index.add(vector, [{"path": "horse", "kind": "image"}], aligner_id="older-weights")
    at = open_page("search", index="demo", q="a horse")
    assert not at.exception
    assert any("older-weights" in e.value for e in at.error)
    at.button(key="rebuild_demo").click().run()
    no_failure(at)
    with FlatIndex.open(stale) as index:
        assert index.aligner_id == embedder.aligner_id
        assert len(index) == len([p for p in DEMO.iterdir() if p.is_dir()])
    assert result_ids(at)


def test_data_roots_and_limits_can_come_from_streamlit_secrets(fresh_data, tmp_path):
    roots = [tmp_path / "first", tmp_path / "second"]
    for root in roots:
        root.mkdir()
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=TIMEOUT)
    at.secrets["VISIONS_DATA_ROOTS"] = [str(r) for r in roots]
    at.secrets["VISIONS_MAX_FILES"] = 1
    at.run()
    at.switch_page("pages/build.py").run()
    at.radio(key="source").set_value("Folder on the server").run()
    assert at.selectbox(key="root").options == [str(r) for r in roots]
    for name in ("a.txt", "b.txt"):
        (roots[0] / name).write_text("two files, one allowed")
    at.button(key="build").click().run()
    assert any("more than 1 files" in e.value for e in at.error)
