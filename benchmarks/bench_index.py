"""Time FlatIndex.search per bucket size against one in-RAM numpy scan (picks DEFAULT_BUCKET_SIZE).

Usage: python benchmarks/bench_index.py [--rows 262144] [--dim 512] [--bucket_sizes 512,4096,16384]
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from visions_core.index import FlatIndex


def best_time(fn, repeats: int) -> float:
    """Fastest of repeats calls, in seconds (the least disturbed by other processes)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    """Build one index per bucket size over the same random unit vectors and time a top-10 query."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=262144)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--bucket_sizes", default="512,4096,16384")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    data = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    query = data[123] + 0.1 * rng.standard_normal(args.dim, dtype=np.float32)
    query /= np.linalg.norm(query)

    def in_ram() -> None:
        scores = data @ query
        np.argpartition(-scores, 9)[:10]

    base = best_time(in_ram, args.repeats)
    print(f"{args.rows} x {args.dim}: in-RAM numpy scan {base * 1000:.1f} ms")
    with tempfile.TemporaryDirectory() as tmp:
        for bucket_size in (int(b) for b in args.bucket_sizes.split(",")):
            path = Path(tmp) / f"b{bucket_size}"
            with FlatIndex.create(path, dim=args.dim, aligner_id="bench", bucket_size=bucket_size) as index:
                for start in range(0, args.rows, 65536):
                    stop = min(start + 65536, args.rows)
                    index.add(data[start:stop], [{"path": f"{i}.jpg"} for i in range(start, stop)])
            with FlatIndex.open(path) as index:
                index.search(query, n=10)  # warm the page cache and the memory maps
                took = best_time(lambda index=index: index.search(query, n=10), args.repeats)
            print(f"bucket_size {bucket_size:>6}: {took * 1000:.1f} ms = {took / base:.2f}x the in-RAM scan")


if __name__ == "__main__":
    main()
