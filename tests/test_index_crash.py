"""FlatIndex under SIGKILL and concurrent readers: a crash leaves an index that opens, agrees and resumes."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from visions_core.index import FlatIndex

ROOT = Path(__file__).resolve().parents[1]
DIM = 8
TOTAL = 600
BUCKET = 4

# A writer that builds items 0..TOTAL-1 in tiny batches: creates the index (or starts over with "rebuild"),
# else appends what is missing. Item i is "items/i.txt" with vector expected_vector(i), so a checker can tell
# whether metadata and vectors agree.
WRITER = """
import sys, time
import numpy as np
from visions_core.index import FlatIndex

path, mode = sys.argv[1], sys.argv[2]
total, batch, dim, bucket = (int(a) for a in sys.argv[3:7])
pause = float(sys.argv[7])

def vector(i):
    return np.random.default_rng(i).standard_normal(dim).astype(np.float32)

print("started", flush=True)
if mode == "rebuild" or not FlatIndex.exists(path):
    index = FlatIndex.create(path, dim=dim, aligner_id="crash", bucket_size=bucket, overwrite=True)
else:
    index = FlatIndex.open(path, writable=True)
done = index.paths()
todo = [i for i in range(total) if f"items/{i}.txt" not in done]
print("writing", flush=True)
for start in range(0, len(todo), batch):
    chunk = todo[start:start + batch]
    records = [{"path": f"items/{i}.txt", "kind": "text"} for i in chunk]
    index.add(np.stack([vector(i) for i in chunk]), records)
    if pause:
        time.sleep(pause)
index.close()
print("done", flush=True)
"""


def expected_vector(i: int) -> np.ndarray:
    """The unit vector the writer stores for item i."""
    vec = np.random.default_rng(i).standard_normal(DIM).astype(np.float32)
    return vec / np.linalg.norm(vec)


def start_writer(path: Path, mode: str = "append", total: int = TOTAL, batch: int = 3, pause: float = 0.0):
    """Launch the writer script in its own interpreter."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    args = [sys.executable, "-c", WRITER, str(path), mode, *map(str, (total, batch, DIM, BUCKET, pause))]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def assert_consistent(path: Path) -> int:
    """The index opens, ids are 0..n-1, paths unique, every vector is its item's; returns n."""
    with FlatIndex.open(path) as index:
        records = index.records()
        count = len(index)
        assert [r["id"] for r in records] == list(range(count))
        paths = [r["path"] for r in records]
        assert len(set(paths)) == count
        for record in records:
            item = int(record["path"].removeprefix("items/").removesuffix(".txt"))
            np.testing.assert_allclose(index.get_vector(record["id"]), expected_vector(item), atol=1e-6)
            assert (record["bucket"], record["row"]) == divmod(record["id"], BUCKET)
        rows_on_disk = sum(f.stat().st_size for f in (path / "buckets").glob("*.f32")) // (DIM * 4)
        assert rows_on_disk >= count
        if count:
            hit = index.search(expected_vector(int(paths[-1][6:-4])), n=1)[0]
            assert hit.id == count - 1 and hit.score == pytest.approx(1.0, abs=1e-5)
        return count


@pytest.mark.slow
def test_sigkill_at_random_moments_never_corrupts_and_append_completes(tmp_path):
    path = tmp_path / "index"
    rng = random.Random(20261203)
    kills = 0
    counts = []
    phases: dict[str, int] = {}
    for attempt in range(60):
        mode = "rebuild" if attempt % 15 == 7 else "append"
        writer = start_writer(path, mode)
        # Half the kills land during start-up and open/create, half while batches are being written.
        marker = "started" if attempt % 2 else "writing"
        line = ""
        while line.strip() not in (marker, "done") and writer.poll() is None:
            line = writer.stdout.readline()
        time.sleep(rng.uniform(0, 0.05 if marker == "started" else 0.15))
        if writer.poll() is None:
            writer.send_signal(signal.SIGKILL)
            kills += 1
        writer.wait(timeout=30)
        phase = writer.stdout.read().split()
        phases[phase[-1] if phase else line.strip()] = phases.get(phase[-1] if phase else line.strip(), 0) + 1
        writer.stdout.close()
        writer.stderr.close()
        if FlatIndex.exists(path):
            counts.append(assert_consistent(path))
    assert kills >= 50, f"only {kills} kills landed ({phases})"
    assert len(set(counts)) > 8, f"kills should land at many different points of the build: {counts} {phases}"

    writer = start_writer(path, "append")
    out, err = writer.communicate(timeout=120)
    assert writer.returncode == 0, err
    assert out.split()[-1] == "done"
    assert assert_consistent(path) == TOTAL


def test_searches_during_appends_answer_from_a_consistent_snapshot(tmp_path):
    path = tmp_path / "index"
    total = 240
    writer = start_writer(path, "rebuild", total=total, batch=2, pause=0.004)
    expected = np.stack([expected_vector(i) for i in range(total)])
    queries = np.stack([expected_vector(i) for i in (0, 7, 100, 239)]) + 0.3
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    seen_counts = set()
    try:
        while not FlatIndex.exists(path):
            assert writer.poll() is None, writer.stderr.read()
            time.sleep(0.005)
        with FlatIndex.open(path) as reader:
            while True:
                finished = writer.poll() is not None
                before = len(reader)
                batch = reader.search(queries, n=5)
                after = len(reader)
                seen_counts.add(before)
                # The answer is the exact top-5 of some committed prefix of the build, never a torn state.
                matches = [
                    m
                    for m in range(before, after + 1)
                    if all(
                        [r.id for r in results] == [int(i) for i in np.argsort(-(expected[:m] @ q))[:5]]
                        for q, results in zip(queries, batch, strict=True)
                    )
                ]
                assert matches, (before, after, batch)
                if finished:
                    break
    finally:
        writer.wait(timeout=60)
        writer.stdout.close()
        writer.stderr.close()
    assert writer.returncode == 0
    assert len(seen_counts) > 5, "the reader should have searched while the writer appended"
    assert max(seen_counts) == total
