"""FlatIndex: exact search over buckets, stored vectors, records, refusals, append, rebuild, lock, roots."""

import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from visions_core.errors import (
    IndexExistsError,
    IndexFormatError,
    IndexLockedError,
    IndexMismatchError,
    IndexNotFoundError,
    ItemNotFoundError,
    UnsafePathError,
)
from visions_core.index import DEFAULT_BUCKET_SIZE, FORMAT_VERSION, SNIPPET_CHARS, FlatIndex, SearchResult

ROOT = Path(__file__).resolve().parents[1]
DIM = 16


def unit_vectors(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    """n random unit float32 vectors."""
    vecs = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def brute_force(stored: np.ndarray, query: np.ndarray, n: int, exclude: tuple[int, ...] = ()):
    """Reference ranking: every score by one numpy product, full sort, best first."""
    q = query / np.linalg.norm(query)
    scores = stored @ q
    scores[list(exclude)] = -np.inf
    order = np.argsort(-scores, kind="stable")
    order = [int(i) for i in order if np.isfinite(scores[i])][:n]
    return order, scores[order]


def build(tmp_path: Path, n: int, bucket_size: int = 4, seed: int = 0) -> tuple[FlatIndex, np.ndarray]:
    """A writable index at tmp_path/index holding n random vectors named 0000.jpg, 0001.jpg, ..."""
    vecs = unit_vectors(n, seed=seed)
    index = FlatIndex.create(tmp_path / "index", dim=DIM, aligner_id="test-aligner", bucket_size=bucket_size)
    index.add(vecs, [{"path": f"{i:04d}.jpg", "kind": "image"} for i in range(n)])
    return index, vecs


def run_python(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter with the repository importable."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.parametrize(("bucket_size", "count"), [(4, 10), (4, 37), (1, 11), (3, 20), (7, 50), (64, 50)])
@pytest.mark.parametrize("n", [1, 5, 10, 100])
def test_search_returns_the_brute_force_top_n_over_all_buckets(tmp_path, bucket_size, count, n):
    index, vecs = build(tmp_path, count, bucket_size)
    for query in unit_vectors(6, seed=99):
        expected_ids, expected_scores = brute_force(vecs, query, n)
        results = index.search(query, n=n)
        assert [r.id for r in results] == expected_ids
        np.testing.assert_allclose([r.score for r in results], expected_scores, rtol=0, atol=1e-5)
        assert [r.path for r in results] == [f"{i:04d}.jpg" for i in expected_ids]
    # the last bucket (the original tool skipped it) is searched: every item finds itself first
    for item_id in (0, count - 1, count // 2):
        assert index.search(vecs[item_id], n=1)[0].id == item_id


@settings(max_examples=40, deadline=None)
@given(
    bucket_size=st.integers(1, 9),
    count=st.integers(0, 40),
    n=st.integers(1, 45),
    seed=st.integers(0, 2**16),
    exclude=st.sets(st.integers(-2, 45), max_size=6),
)
def test_any_bucket_size_count_and_exclusion_matches_brute_force(bucket_size, count, n, seed, exclude):
    with tempfile.TemporaryDirectory() as tmp:
        index, vecs = build(Path(tmp), count, bucket_size, seed=seed)
        with index:
            queries = unit_vectors(3, seed=seed + 1)
            batch = index.search(queries, n=n, exclude_ids=exclude)
            valid = tuple(i for i in exclude if 0 <= i < count)
            for query, results in zip(queries, batch, strict=True):
                assert [r.id for r in results] == brute_force(vecs, query, n, valid)[0]


def test_batch_search_equals_one_search_per_query(tmp_path):
    index, vecs = build(tmp_path, 23, bucket_size=4)
    queries = unit_vectors(5, seed=7)
    batch = index.search(queries, n=6)
    assert len(batch) == 5
    for query, results in zip(queries, batch, strict=True):
        assert [r.id for r in results] == brute_force(vecs, query, 6)[0]
        single = index.search(query, n=6)
        assert [r.id for r in results] == [r.id for r in single]
        np.testing.assert_allclose([r.score for r in results], [r.score for r in single], atol=1e-6)


def test_threads_sharing_one_handle_get_exact_answers(tmp_path):
    writer, vecs = build(tmp_path, 30, bucket_size=4)
    writer.close()
    reader = FlatIndex.open(tmp_path / "index")
    queries = unit_vectors(40, seed=11)
    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(lambda q: [r.id for r in reader.search(q, n=7)], queries))
    assert answers == [brute_force(vecs, q, 7)[0] for q in queries]


def test_search_results_are_typed_and_best_first(tmp_path):
    index, vecs = build(tmp_path, 12)
    results = index.search(vecs[5], n=12)
    assert all(isinstance(r, SearchResult) and isinstance(r.score, float) for r in results)
    assert results[0] == SearchResult(5, "0005.jpg", pytest.approx(1.0, abs=1e-5), "image")
    assert [r.score for r in results] == sorted((r.score for r in results), reverse=True)
    assert sorted(r.id for r in results) == list(range(12))


def test_search_scores_unnormalised_queries_by_cosine(tmp_path):
    index, vecs = build(tmp_path, 9)
    assert [r.id for r in index.search(vecs[2] * 7.5, n=3)] == brute_force(vecs, vecs[2], 3)[0]


def test_exclude_ids_removes_exactly_those_items(tmp_path):
    index, vecs = build(tmp_path, 19, bucket_size=4)
    query = vecs[3]
    excluded = (3, 4, 18)
    results = index.search(query, n=19, exclude_ids=excluded)
    assert [r.id for r in results] == brute_force(vecs, query, 19, excluded)[0]
    assert len(results) == 16


def test_empty_index_and_zero_n_return_no_results(tmp_path):
    index = FlatIndex.create(tmp_path / "index", dim=DIM, aligner_id="a", bucket_size=4)
    assert len(index) == 0
    assert index.search(unit_vectors(1)[0], n=5) == []
    assert index.search(unit_vectors(2), n=5) == [[], []]
    index.add(unit_vectors(3), [{"path": f"{i}.txt", "kind": "text"} for i in range(3)])
    assert index.search(unit_vectors(1)[0], n=0) == []


def test_stored_vectors_are_unit_float32_and_match_what_was_added(tmp_path):
    raw = np.random.default_rng(3).standard_normal((10, DIM)) * 5  # float64, not unit length
    index = FlatIndex.create(tmp_path / "index", dim=DIM, aligner_id="a", bucket_size=4)
    index.add(raw, [{"path": f"{i}.jpg"} for i in range(10)])
    for i in range(10):
        vec = index.get_vector(i)
        assert vec.dtype == np.float32 and vec.shape == (DIM,)
        assert np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-6)
        np.testing.assert_allclose(vec, raw[i] / np.linalg.norm(raw[i]), atol=1e-6)
    np.testing.assert_array_equal(index.get_vector_by_path("7.jpg"), index.get_vector(7))


def test_records_keep_metadata_bucket_and_row(tmp_path):
    index = FlatIndex.create(tmp_path / "index", dim=DIM, aligner_id="a", bucket_size=4)
    long_text = "word " * 200
    records = [
        {"path": "a b/ç.txt", "kind": "text", "size": 1000, "mtime": 1.5, "hash": "h1", "snippet": long_text},
        {"path": "x.jpg", "kind": "image", "size": 20, "mtime": 2.0, "hash": "h2"},
    ] + [{"path": f"item{i}", "kind": "mixed"} for i in range(5)]
    assert index.add(unit_vectors(7), records) == list(range(7))
    text = index.get_record(0)
    assert text["path"] == "a b/ç.txt" and text["kind"] == "text" and text["size"] == 1000
    assert text["mtime"] == 1.5 and text["hash"] == "h1" and text["snippet"] == long_text[:SNIPPET_CHARS]
    assert index.get_record(1)["snippet"] is None
    assert (index.get_record(6)["bucket"], index.get_record(6)["row"]) == (1, 2)
    assert index.get_record_by_path("x.jpg")["id"] == 1
    assert [r["id"] for r in index.records(offset=2, limit=3)] == [2, 3, 4]
    assert len(index.records()) == 7
    assert index.paths() == {r["path"] for r in records}
    with pytest.raises(ItemNotFoundError):
        index.get_record(7)
    with pytest.raises(ItemNotFoundError):
        index.get_vector(-1)
    with pytest.raises(ItemNotFoundError):
        index.get_record_by_path("missing.jpg")


def test_vectors_of_another_dimension_or_aligner_are_refused(tmp_path):
    index, _ = build(tmp_path, 5)
    with pytest.raises(IndexMismatchError, match="16-dimensional"):
        index.add(unit_vectors(2, dim=8), [{"path": "p1"}, {"path": "p2"}])
    with pytest.raises(IndexMismatchError, match="test-aligner"):
        index.add(unit_vectors(1), [{"path": "p3"}], aligner_id="other-aligner")
    with pytest.raises(IndexMismatchError, match="16-dimensional"):
        index.search(unit_vectors(1, dim=8)[0])
    with pytest.raises(IndexMismatchError, match="NaN"):
        index.add(np.full((1, DIM), np.nan), [{"path": "p4"}])
    with pytest.raises(IndexMismatchError, match="zero"):
        index.add(np.zeros((1, DIM)), [{"path": "p5"}])
    with pytest.raises(IndexMismatchError):
        index.check_compatible(aligner_id="other-aligner")
    index.check_compatible(aligner_id="test-aligner", dim=DIM)
    assert len(index) == 5
    index.add(unit_vectors(1), [{"path": "ok"}], aligner_id="test-aligner")
    assert len(index) == 6


def test_another_format_version_is_refused_and_rebuild_replaces_it(tmp_path):
    build(tmp_path, 5)[0].close()
    with sqlite3.connect(tmp_path / "index" / "index.db") as db:
        db.execute("UPDATE config SET value = ? WHERE key = 'format_version'", (str(FORMAT_VERSION + 1),))
    db.close()
    assert FlatIndex.exists(tmp_path / "index")
    with pytest.raises(IndexFormatError, match=f"format version {FORMAT_VERSION + 1}"):
        FlatIndex.open(tmp_path / "index")
    with pytest.raises(IndexExistsError):
        FlatIndex.create(tmp_path / "index", dim=DIM, aligner_id="a")
    with FlatIndex.create(tmp_path / "index", dim=DIM, aligner_id="a", overwrite=True) as index:
        assert len(index) == 0
    assert len(FlatIndex.open(tmp_path / "index")) == 0


def test_a_damaged_database_is_reported_and_can_be_rebuilt(tmp_path):
    build(tmp_path, 3)[0].close()
    db = tmp_path / "index" / "index.db"
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    db.write_bytes(b"this is not an SQLite database" * 100)
    assert FlatIndex.exists(tmp_path / "index")
    with pytest.raises(IndexFormatError, match="damaged"):
        FlatIndex.open(tmp_path / "index")
    with pytest.raises(IndexExistsError):
        FlatIndex.create(tmp_path / "index", dim=DIM, aligner_id="a")
    with FlatIndex.create(tmp_path / "index", dim=DIM, aligner_id="a", overwrite=True) as index:
        index.add(unit_vectors(2), [{"path": "a"}, {"path": "b"}])
    assert len(FlatIndex.open(tmp_path / "index")) == 2


def test_a_create_killed_before_its_first_commit_leaves_no_index(tmp_path):
    (tmp_path / "index").mkdir()
    db = sqlite3.connect(tmp_path / "index" / "index.db")
    db.execute("PRAGMA journal_mode=WAL")
    db.close()
    assert not FlatIndex.exists(tmp_path / "index")
    with pytest.raises(IndexNotFoundError):
        FlatIndex.open(tmp_path / "index")
    with FlatIndex.create(tmp_path / "index", dim=DIM, aligner_id="a") as index:
        assert len(index) == 0


def test_missing_index_is_reported(tmp_path):
    assert not FlatIndex.exists(tmp_path / "nowhere")
    with pytest.raises(IndexNotFoundError, match="no index"):
        FlatIndex.open(tmp_path / "nowhere")


def test_append_skips_paths_already_present(tmp_path):
    index, vecs = build(tmp_path, 10)
    index.close()
    more = unit_vectors(6, seed=5)
    with FlatIndex.open(tmp_path / "index", writable=True) as index:
        paths = ["0002.jpg", "new1.jpg", "0009.jpg", "new2.jpg", "new1.jpg", "new3.jpg"]
        ids = index.add(more, [{"path": p} for p in paths])
        assert ids == [2, 10, 9, 11, 10, 12]
        assert len(index) == 13
        # the first vector offered for a path is kept; repeats never replace it
        np.testing.assert_allclose(index.get_vector(2), vecs[2], atol=1e-6)
        np.testing.assert_allclose(index.get_vector(10), more[1], atol=1e-6)
        assert index.add(more, [{"path": p} for p in paths]) == ids
        assert len(index) == 13
        assert len(index.paths()) == 13


def test_rebuild_starts_over(tmp_path):
    build(tmp_path, 10)[0].close()
    with pytest.raises(IndexExistsError, match="already exists"):
        FlatIndex.create(tmp_path / "index", dim=DIM, aligner_id="test-aligner")
    with FlatIndex.create(tmp_path / "index", dim=8, aligner_id="v2", bucket_size=3, overwrite=True) as index:
        assert len(index) == 0 and index.dim == 8 and index.aligner_id == "v2" and index.bucket_size == 3
        assert not index.contains_path("0001.jpg")
        fresh = unit_vectors(4, dim=8, seed=1)
        index.add(fresh, [{"path": f"{i:04d}.jpg"} for i in range(4)])
    with FlatIndex.open(tmp_path / "index") as index:
        assert len(index) == 4
        assert index.search(fresh[3], n=1)[0].id == 3
        np.testing.assert_allclose(index.get_vector(0), fresh[0], atol=1e-6)
    assert len(list((tmp_path / "index" / "buckets").iterdir())) == 2


def test_a_reader_follows_a_rebuild_by_another_handle(tmp_path):
    writer, _ = build(tmp_path, 10)
    reader = FlatIndex.open(tmp_path / "index")
    assert len(reader.search(unit_vectors(1)[0], n=20)) == 10
    writer.close()
    with FlatIndex.create(tmp_path / "index", dim=8, aligner_id="v2", overwrite=True) as rebuilt:
        rebuilt.add(unit_vectors(3, dim=8), [{"path": f"n{i}"} for i in range(3)])
    assert reader.dim == 8 or len(reader) == 3  # the config is re-read with the new generation
    assert reader.dim == 8 and reader.aligner_id == "v2"
    assert [r.path for r in reader.search(unit_vectors(3, dim=8)[2], n=1)] == ["n2"]


def test_default_bucket_size_is_used(tmp_path):
    with FlatIndex.create(tmp_path / "index", dim=DIM, aligner_id="a") as index:
        assert index.bucket_size == DEFAULT_BUCKET_SIZE


def test_read_only_handle_cannot_add_and_closed_handle_refuses(tmp_path):
    build(tmp_path, 3)[0].close()
    reader = FlatIndex.open(tmp_path / "index")
    with pytest.raises(IndexLockedError, match="read-only"):
        reader.add(unit_vectors(1), [{"path": "x"}])
    reader.close()
    reader.close()
    with pytest.raises(IndexNotFoundError, match="closed"):
        len(reader)


def test_second_writer_in_this_process_fails_fast_while_readers_work(tmp_path):
    index, vecs = build(tmp_path, 6)
    with pytest.raises(IndexLockedError, match=f"index is locked by pid {os.getpid()} "):
        FlatIndex.open(tmp_path / "index", writable=True)
    with pytest.raises(IndexLockedError):
        FlatIndex.create(tmp_path / "index", dim=DIM, aligner_id="a", overwrite=True)
    with FlatIndex.open(tmp_path / "index") as reader:
        assert reader.search(vecs[4], n=1)[0].id == 4
    index.close()
    with FlatIndex.open(tmp_path / "index", writable=True) as again:
        assert again.writable


LOCK_PROBE = """
import sys, time
from visions_core.errors import IndexLockedError
from visions_core.index import FlatIndex
start = time.monotonic()
try:
    FlatIndex.open(sys.argv[1], writable=True)
except IndexLockedError as exc:
    print(exc, f"after {time.monotonic() - start:.3f}s")
    sys.exit(3)
print("acquired")
"""

LOCK_HOLDER = """
import sys, time
from visions_core.index import FlatIndex
index = FlatIndex.open(sys.argv[1], writable=True)
print("holding", flush=True)
time.sleep(120)
"""


def test_second_writer_process_fails_fast_and_the_lock_dies_with_its_holder(tmp_path):
    index, _ = build(tmp_path, 4)
    probe = run_python(LOCK_PROBE, str(tmp_path / "index"))
    assert probe.returncode == 3, probe.stderr
    assert f"index is locked by pid {os.getpid()} (" in probe.stdout
    assert float(probe.stdout.rsplit("after ", 1)[1].rstrip("s\n")) < 1.0
    index.close()

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(tmp_path / "index")],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(IndexLockedError, match=f"pid {holder.pid} "):
            FlatIndex.open(tmp_path / "index", writable=True)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    with FlatIndex.open(tmp_path / "index", writable=True) as index:
        assert len(index) == 4
    assert run_python(LOCK_PROBE, str(tmp_path / "index")).stdout.strip() == "acquired"


def test_data_root_inside_paths_and_moving_the_folder(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "cat.jpg").write_bytes(b"x")
    with FlatIndex.create(data / "index", dim=DIM, aligner_id="a", data_root=data) as index:
        assert index.data_root == data
        index.add(unit_vectors(2), [{"path": data / "sub" / "cat.jpg"}, {"path": "sub/../dog.jpg"}])
        assert [r["path"] for r in index.records()] == ["sub/cat.jpg", "dog.jpg"]
        assert index.contains_path(data / "sub" / "cat.jpg")
        for escape in ("../secret.txt", "/etc/passwd", tmp_path / "other.jpg", "sub/../../x"):
            with pytest.raises(UnsafePathError):
                index.add(unit_vectors(1), [{"path": escape}])
            with pytest.raises(UnsafePathError):
                index.resolve(escape)
    moved = tmp_path / "moved"
    data.rename(moved)
    with FlatIndex.open(moved / "index") as index:
        assert index.data_root == moved
        assert index.resolve("sub/cat.jpg") == moved / "sub" / "cat.jpg"
        assert index.resolve(index.get_record(0)["path"]).read_bytes() == b"x"


def test_data_root_outside_the_index_is_kept_absolute(tmp_path):
    with FlatIndex.create(
        tmp_path / "indexes" / "one", dim=DIM, aligner_id="a", data_root=tmp_path / "d"
    ) as ix:
        assert ix.data_root == tmp_path / "d"
    assert FlatIndex.open(tmp_path / "indexes" / "one").resolve("a.jpg") == tmp_path / "d" / "a.jpg"
    with FlatIndex.create(tmp_path / "plain", dim=DIM, aligner_id="a") as index:
        assert index.data_root == tmp_path


def test_replace_overwrites_an_items_vector_and_record_in_place_and_refuses_unknown_paths(tmp_path):
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(6, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    records = [
        {"path": f"item_{i}.txt", "kind": "text", "size": i, "mtime": 1.0, "hash": f"h{i}"} for i in range(6)
    ]
    with FlatIndex.create(tmp_path / "ix", dim=8, aligner_id="a", bucket_size=4) as index:
        index.add(vectors, records)
        fresh = -vectors[4]
        assert index.replace(fresh, [{"path": "item_4.txt", "kind": "text", "size": 9, "hash": "new"}]) == [4]
        assert len(index) == 6
        np.testing.assert_allclose(index.get_vector(4), fresh, atol=1e-6)
        np.testing.assert_array_equal(index.get_vector(5), vectors[5])
        assert index.stamps()["item_4.txt"] == (9, None, "new")
        assert index.search(fresh, n=1)[0].id == 4
        with pytest.raises(ItemNotFoundError, match=r"item_9\.txt"):
            index.replace(vectors[0], [{"path": "item_9.txt"}])
    with FlatIndex.open(tmp_path / "ix") as reopened:
        np.testing.assert_allclose(reopened.get_vector(4), fresh, atol=1e-6)
