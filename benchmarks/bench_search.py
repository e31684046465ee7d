"""Top-10 search latency of FlatIndex vs one in-RAM numpy scan vs faiss IndexFlatIP, and search peak RSS.

For each N (10k, 100k, 1M up to --max-n) random unit vectors are written to a FlatIndex in a temporary folder.
Latencies are medians of warm calls, the three contenders called in turn each round (so the shared machine's
load hits them alike). Peak RSS (VmHWM) is measured in a child process that only opens the index and searches,
so the baselines' in-RAM arrays do not count. Prints a table; the last line is one JSON object.

Usage: python benchmarks/bench_search.py [--max-n 1000000] [--quick] [--bucket-sizes 4096,16384]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
from benchlib import interleaved_ms, print_table, rss_mb

SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (2_000, 10_000)
TOP_K = 10
BATCH = 32
ADD_ROWS = 65_536
DEFAULT_DIM = 512


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> npt.NDArray[np.float32]:
    """n random unit float32 vectors (uniform on the sphere)."""
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def queries(seed: int, dim: int) -> npt.NDArray[np.float32]:
    """The (1 + BATCH, dim) query vectors shared by the parent and the child (same seed, same rows)."""
    return unit_rows(np.random.default_rng(seed + 1), 1 + BATCH, dim)


def numpy_top(data: npt.NDArray[np.float32], q: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
    """Top-10 row ids by inner product: one BLAS product plus a partial sort (the in-RAM floor)."""
    scores = q @ data.T
    part = np.argpartition(-scores, TOP_K - 1, axis=-1)[..., :TOP_K]
    order = np.argsort(-np.take_along_axis(scores, part, axis=-1), axis=-1)
    return np.take_along_axis(part, order, axis=-1)


def write_index(path: Path, data: npt.NDArray[np.float32], bucket_size: int | None) -> None:
    """Write data to a new FlatIndex at path (bucket_size None = the index's default)."""
    from visions_core.index import FlatIndex

    extra = {} if bucket_size is None else {"bucket_size": bucket_size}
    with FlatIndex.create(path, dim=data.shape[1], aligner_id="bench", **extra) as index:
        for start in range(0, len(data), ADD_ROWS):
            stop = min(start + ADD_ROWS, len(data))
            index.add(data[start:stop], [{"path": f"{i}.jpg"} for i in range(start, stop)])


def child(path: Path, seed: int, repeats: int) -> dict[str, object]:
    """Open the index read-only and time top-10 search (one query and a batch); the search-only process."""
    from visions_core.index import FlatIndex

    base_rss, _ = rss_mb()
    with FlatIndex.open(path) as index:
        q = queries(seed, index.dim)
        one_ms = interleaved_ms({"one": lambda: index.search(q[0], n=TOP_K)}, repeats)["one"]
        batch = {"batch": lambda: index.search(q[1:], n=TOP_K)}
        batch_ms = interleaved_ms(batch, max(3, repeats // 4))["batch"]
        top = [r.id for r in index.search(q[0], n=TOP_K)]
    _, peak = rss_mb()
    return {"index_ms": one_ms, "index_batch_ms": batch_ms, "top": top, "base_rss_mb": base_rss,
            "peak_mb": peak}  # fmt: skip


def run_child(path: Path, seed: int, repeats: int) -> dict[str, object]:
    """Run child() in a fresh interpreter and return its JSON answer."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(path), "--seed", str(seed), "--repeats", str(repeats)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def faiss_index(data: npt.NDArray[np.float32]) -> object | None:
    """A faiss IndexFlatIP over data, or None when faiss-cpu is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    flat = faiss.IndexFlatIP(data.shape[1])
    flat.add(data)
    return flat


def bench_size(n: int, dim: int, args: argparse.Namespace, tmp: Path) -> list[dict[str, object]]:
    """All measurements at one N (one row per bucket size)."""
    from visions_core.index import FlatIndex

    data = unit_rows(np.random.default_rng(args.seed), n, dim)
    q = queries(args.seed, dim)
    repeats = args.repeats or (5 if args.quick else max(7, min(51, 20_000_000 // n)))
    flat = faiss_index(data)
    rows = []
    for bucket_size in args.bucket_sizes or [None]:
        path = tmp / f"n{n}-b{bucket_size}"
        start = time.perf_counter()
        write_index(path, data, bucket_size)
        write_s = time.perf_counter() - start
        # Memory is measured apart, in a process that holds nothing but the open index.
        child_run = run_child(path, args.seed, repeats)
        with FlatIndex.open(path) as index:
            one = {"index": lambda i=index: i.search(q[0], n=TOP_K), "numpy": lambda: numpy_top(data, q[0])}
            batch = {"index": lambda i=index: i.search(q[1:], TOP_K), "numpy": lambda: numpy_top(data, q[1:])}
            if flat is not None:
                one["faiss"] = lambda: flat.search(q[:1], TOP_K)
                batch["faiss"] = lambda: flat.search(q[1:], TOP_K)
            one_ms = interleaved_ms(one, repeats)
            batch_ms = interleaved_ms(batch, max(3, repeats // 4))
            bucket_size = index.bucket_size
        row: dict[str, object] = {
            "n": n,
            "bucket_size": bucket_size,
            "index_ms": one_ms["index"],
            "numpy_ms": one_ms["numpy"],
            "faiss_ms": one_ms.get("faiss"),
            "index_over_numpy": one_ms["index"] / one_ms["numpy"],
            "index_over_faiss": one_ms["index"] / one_ms["faiss"] if flat is not None else None,
            "index_batch32_ms": batch_ms["index"],
            "numpy_batch32_ms": batch_ms["numpy"],
            "faiss_batch32_ms": batch_ms.get("faiss"),
            "child_index_ms": child_run["index_ms"],
            "same_top10": child_run["top"] == numpy_top(data, q[0]).tolist(),
            "search_peak_rss_mb": child_run["peak_mb"],
            "search_base_rss_mb": child_run["base_rss_mb"],
            "search_rss_over_vector_bytes": child_run["peak_mb"] * 2**20 / data.nbytes,
            "write_s": write_s,
        }
        rows.append(row)
        _remove_tree(path)
    return rows


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


TABLE_COLUMNS = (
    "n", "bucket_size", "index_ms", "numpy_ms", "faiss_ms", "index_over_numpy", "index_over_faiss",
    "index_batch32_ms", "numpy_batch32_ms", "faiss_batch32_ms", "child_index_ms", "search_peak_rss_mb",
    "search_rss_over_vector_bytes", "same_top10",
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of this benchmark."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-n", type=int, default=SIZES[-1], help="largest N (default %(default)s)")
    parser.add_argument("--dim", type=int, default=DEFAULT_DIM, help="vector dimension (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="small N and few repeats: finishes in seconds")
    parser.add_argument("--repeats", type=int, default=0, help="timed calls per measure (default: by N)")
    parser.add_argument(
        "--bucket-sizes",
        type=lambda s: [int(b) for b in s.split(",")],
        default=None,
        help="comma-separated bucket sizes to compare (default: the index's own)",
    )
    parser.add_argument("--tmp-dir", default=None, help="folder for the temporary indexes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table and the JSON line."""
    args = build_parser().parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.seed, args.repeats or 5)))
        return 0
    sizes = [n for n in (QUICK_SIZES if args.quick else SIZES) if n <= args.max_n] or [args.max_n]
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="visions-bench-", dir=args.tmp_dir) as tmp:
        for n in sizes:
            rows.extend(bench_size(n, args.dim, args, Path(tmp)))
    print(f"dim {args.dim}, top-{TOP_K}, {os.cpu_count()} CPUs; times are medians in ms (warm page cache)")
    print_table(rows, TABLE_COLUMNS)
    print(json.dumps({"dim": args.dim, "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
