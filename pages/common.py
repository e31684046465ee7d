"""Shared app helpers: settings, session state, cached engine handles, build progress, query params."""

from __future__ import annotations

import io
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import streamlit as st

from visions_core.errors import VisionsError
from visions_core.uploads import UploadLimits, parse_roots, safe_name

if TYPE_CHECKING:
    from visions_core.build import BuildReport, Progress
    from visions_core.embedder import Embedder
    from visions_core.index import FlatIndex, SearchResult
    from visions_core.search import Searcher

APP_ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = APP_ROOT / "demo" / "dataset"
DEMO_INDEX = "demo"
DEMO_LAYOUT = "mixed_dir"
LIMIT_KEYS = ("VISIONS_MAX_UPLOAD_MB", "VISIONS_MAX_EXTRACTED_MB", "VISIONS_MAX_FILES")
THUMB_PX = 320


# -- settings ----------------------------------------------------------------------------------------------


def setting(name: str) -> Any:
    """A setting from the environment, else from st.secrets, else None."""
    if os.environ.get(name):
        return os.environ[name]
    try:
        return st.secrets.get(name)
    except Exception:
        # No secrets.toml at all is the normal case, and Streamlit reports it by raising.
        return None


def data_dir() -> Path:
    """The app's data folder (VISIONS_DATA_DIR, default ./data beside the app), created on first use."""
    folder = Path(setting("VISIONS_DATA_DIR") or APP_ROOT / "data").expanduser().absolute()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def indexes_dir() -> Path:
    """Where the app keeps its indexes, one folder per index name."""
    return data_dir() / "indexes"


def index_path(name: str) -> Path:
    """The folder of the index called name (the name is sanitised, so it cannot point elsewhere)."""
    return indexes_dir() / safe_name(name, max_length=60)


def data_roots() -> list[Path]:
    """Folders users may index: VISIONS_DATA_ROOTS (env or secrets), default the data dir and the demo."""
    return parse_roots(setting("VISIONS_DATA_ROOTS"), [data_dir(), DEMO_DIR])


def upload_limits() -> UploadLimits:
    """Upload and item-count limits from the environment or secrets."""
    return UploadLimits.from_mapping({key: setting(key) for key in LIMIT_KEYS})


# -- session state -----------------------------------------------------------------------------------------


def init_state() -> None:
    """Create the session keys every page relies on."""
    defaults: dict[str, Any] = {
        "trail": [],
        "trail_index": None,
        "query_images": {},
        "last_report": None,
        "gallery_last": {},
    }
    for key, value in defaults.items():
        st.session_state.setdefault(key, value)


# -- cached engine handles ---------------------------------------------------------------------------------


@st.cache_resource(show_spinner="Loading the encoders and aligners…")
def get_embedder() -> Embedder:
    """The shared embedder, loaded once per process."""
    from visions_core.embedder import load_embedder

    return load_embedder()


@st.cache_resource(show_spinner=False)
def _open_index(path: str) -> FlatIndex:
    from visions_core.index import FlatIndex

    return FlatIndex.open(path)


def get_index(name: str) -> FlatIndex:
    """A cached read-only handle on the named index (it sees later appends; rebuilds reload it)."""
    return _open_index(str(index_path(name)))


def get_searcher(name: str) -> Searcher:
    """A searcher over the named index with the shared embedder."""
    from visions_core.search import Searcher

    return Searcher(get_embedder(), get_index(name))


def refresh_indexes() -> None:
    """Forget cached index handles and listings, e.g. after a build."""
    # Handles are not closed here: another session may be searching with one; they close when collected.
    _open_index.clear()
    _index_summary.clear()


@dataclass(frozen=True)
class IndexInfo:
    """What the app shows about one index."""

    name: str
    items: int
    kinds: dict[str, int]
    data_root: str
    aligner_id: str


@st.cache_data(show_spinner=False, max_entries=64)
def _index_summary(path: str, items: int, generation: float) -> tuple[dict[str, int], str, str]:
    from visions_core.index import FlatIndex

    with FlatIndex.open(path) as index:
        kinds = Counter(record["kind"] for record in index.records())
        return dict(sorted(kinds.items())), str(index.data_root), index.aligner_id


def list_indexes() -> list[IndexInfo]:
    """Every index in the data folder with its size and item kinds (unreadable ones are left out)."""
    from visions_core.index import FlatIndex

    found = []
    folder = indexes_dir()
    if not folder.is_dir():
        return found
    for path in sorted(p for p in folder.iterdir() if p.is_dir() and FlatIndex.exists(p)):
        try:
            index = get_index(path.name)
            items = len(index)
            kinds, root, aligner = _index_summary(str(path), items, _mtime(path))
        except VisionsError:
            continue
        found.append(IndexInfo(path.name, items, kinds, root, aligner))
    return found


def _mtime(path: Path) -> float:
    """Latest modification time among an index's files: changes whenever it is rebuilt or appended to."""
    return max((p.stat().st_mtime for p in path.iterdir() if p.is_file()), default=0.0)


def kinds_label(kinds: dict[str, int]) -> str:
    """'12 image · 3 text' style summary of item kinds."""
    return " · ".join(f"{n} {kind}" for kind, n in kinds.items()) or "empty"


# -- building ----------------------------------------------------------------------------------------------


def progress_reporter(bar: Any) -> Progress:
    """A build progress callback that drives an st.progress bar with counts, items/s and ETA."""
    started = time.perf_counter()

    def report(done: int, total: int) -> None:
        elapsed = max(time.perf_counter() - started, 1e-6)
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 else 0.0
        text = f"{done}/{total} items · {rate:.1f} items/s · ETA {eta:.0f} s"
        bar.progress(min(done / total, 1.0) if total else 1.0, text=text)

    return report


def run_build(data: Path, name: str, **options: Any) -> BuildReport:
    """Build (or extend) the named index from a folder with a live progress bar, then refresh the caches."""
    from visions_core.build import build_index

    embedder = get_embedder()
    bar = st.progress(0.0, text="Scanning the folder…")
    try:
        report = build_index(
            data, embedder, index_path=index_path(name), progress=progress_reporter(bar), **options
        )
    finally:
        refresh_indexes()
    changed = f", {report.updated} updated" if report.updated else ""
    bar.progress(1.0, text=f"Done: {report.added} added{changed} in {report.seconds:.1f} s")
    st.session_state["last_report"] = {"name": name, "report": report}
    return report


def build_demo_index() -> BuildReport:
    """Build the bundled demo index, or complete it; rebuild when it was made with other weights."""
    from visions_core.index import FlatIndex

    path = index_path(DEMO_INDEX)
    mode = "create"
    if FlatIndex.exists(path):
        with FlatIndex.open(path) as index:
            same = index.aligner_id == get_embedder().aligner_id
        mode = "append" if same else "rebuild"
    return run_build(DEMO_DIR, DEMO_INDEX, layout=DEMO_LAYOUT, mode=mode)


def show_report(report: BuildReport) -> None:
    """Summary metrics of a build and a table of skipped files with their reasons."""
    cols = st.columns(5)
    cols[0].metric("Added", report.added)
    cols[1].metric("Updated", report.updated, help="Already indexed, but the file's content changed")
    cols[2].metric("Already present", report.present)
    cols[3].metric("Skipped", len(report.skipped))
    cols[4].metric("Seconds", f"{report.seconds:.1f}")
    if report.skipped:
        st.caption("Skipped files and why")
        table = pd.DataFrame([{"path": s.path, "reason": s.reason} for s in report.skipped])
        st.dataframe(table, hide_index=True, width="stretch")


# -- query parameters --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewParams:
    """The search view a URL describes: ?index=…&item=… or ?index=…&q=…, plus top-n."""

    index: str | None = None
    item: int | None = None
    q: str | None = None
    n: int | None = None


def read_view_params() -> ViewParams:
    """The current URL's view; malformed numbers are ignored rather than failing the page."""
    params = st.query_params

    def number(key: str) -> int | None:
        try:
            return int(params[key])
        except (KeyError, ValueError):
            return None

    return ViewParams(params.get("index") or None, number("item"), params.get("q") or None, number("n"))


def write_view_params(view: ViewParams) -> None:
    """Mirror a view in the URL so a copied link reproduces it (only changes the URL when needed)."""
    wanted = {k: str(v) for k, v in vars(view).items() if v is not None}
    if dict(st.query_params) != wanted:
        st.query_params.from_dict(wanted)


# -- display -----------------------------------------------------------------------------------------------


@st.cache_data(show_spinner=False, max_entries=2000)
def thumbnail(path: str, mtime: float) -> bytes | None:
    """A small JPEG of an image file (None when it cannot be decoded), cached by path and mtime."""
    from visions_core.encoders import load_image

    try:
        image = load_image(Path(path))
    except (VisionsError, OSError):
        return None
    image.thumbnail((THUMB_PX, THUMB_PX))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


def results_csv(index: FlatIndex, results: list[SearchResult]) -> str:
    """Ranked results as CSV: rank, id, path, kind, score and the text snippet."""
    rows = [
        {
            "rank": rank,
            "id": hit.id,
            "path": hit.path,
            "kind": hit.kind,
            "score": round(hit.score, 6),
            "snippet": index.get_record(hit.id)["snippet"] or "",
        }
        for rank, hit in enumerate(results, 1)
    ]
    return pd.DataFrame(rows, columns=["rank", "id", "path", "kind", "score", "snippet"]).to_csv(index=False)


def show_error(exc: BaseException) -> None:
    """A one-line error message instead of a traceback."""
    st.error(str(exc) or type(exc).__name__, icon=":material/error:")
