"""Indexing throughput: raw encoder rate on pre-decoded inputs vs end-to-end build_index, and peak RSS.

On the same real images (../shared/data/flickr8k/images or --images) and captions, in one run: (a) the
embedder's rate on tensors decoded and preprocessed beforehand (the ceiling), (b) build_index's items/s from
files on disk (decode overlapped with inference), and their ratio; the same for texts (one caption per .txt
file). Raw and end-to-end passes alternate round by round, so the shared machine's load hits both alike; rates
are medians. Prints a table; the last line is one JSON object.

Bucket sizes of the index are compared by `bench_search.py --bucket-sizes`.

Usage: python benchmarks/bench_index.py [--images DIR] [--limit 256] [--texts 1024] [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchlib import captions, image_files, parser_with_inputs, print_table, reset_peak_rss, rss_mb


def timed_s(fn: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def build_once(data_dir: Path, index_path: Path, embedder: object, batch_size: int) -> tuple[float, float]:
    """Seconds of one full build_index (rebuild) and the RSS it added over what was resident before, in MB."""
    from visions_core.build import build_index

    before, _ = rss_mb()
    can_reset = reset_peak_rss()
    report = None

    def run() -> None:
        nonlocal report
        report = build_index(data_dir, embedder, index_path=index_path, mode="rebuild", batch_size=batch_size)

    seconds = timed_s(run)
    _, peak = rss_mb()
    if report is not None and report.skipped:
        raise SystemExit(f"build skipped {len(report.skipped)} items, e.g. {report.skipped[0]}")
    return seconds, (peak - before) if can_reset else float("nan")


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of this benchmark."""
    parser = parser_with_inputs(__doc__)
    parser.add_argument("--limit", type=int, default=256, help="images to index (default %(default)s)")
    parser.add_argument("--texts", type=int, default=1024, help="captions to index (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="build batch size (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="raw/end-to-end rounds (default %(default)s)")
    parser.add_argument("--weights", type=Path, default=None, help="weights folder (default: the shipped)")
    parser.add_argument("--quick", action="store_true", help="8 images, 32 captions, one round: a smoke run")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table and the JSON line."""
    args = build_parser().parse_args(argv)
    if args.quick:
        args.limit, args.texts, args.repeats = min(args.limit, 8), min(args.texts, 32), 1
    import torch

    from visions_core.embedder import load_embedder
    from visions_core.encoders import load_image, preprocess

    embedder = load_embedder(args.weights)
    files = image_files(args.images, args.limit)
    if not files:
        raise SystemExit(f"no images in {args.images}")
    texts = captions(args.captions, args.texts) if args.captions.is_file() else []
    bs = args.batch_size
    with tempfile.TemporaryDirectory(prefix="visions-bench-") as tmp_name:
        tmp = Path(tmp_name)
        img_dir, txt_dir = tmp / "images", tmp / "texts"
        img_dir.mkdir()
        txt_dir.mkdir()
        for f in files:
            shutil.copy2(f, img_dir / f.name)  # fresh copies sit in the page cache, like a warm photo folder
        for i, text in enumerate(texts):
            (txt_dir / f"{i:06d}.txt").write_text(text + "\n", encoding="utf-8")
        pixels = torch.stack([preprocess(load_image(f)) for f in files])
        embedder.embed_pixels(pixels[:bs])  # warm up the model and its thread pools
        if texts:
            embedder.embed_texts(texts[:bs])

        text_chunks = [texts[i : i + bs] for i in range(0, len(texts), bs)]
        passes: dict[str, list[float]] = {"raw_img": [], "e2e_img": [], "raw_txt": [], "e2e_txt": []}
        extra_mb: list[float] = []
        for _ in range(args.repeats):
            passes["raw_img"].append(timed_s(lambda: [embedder.embed_pixels(p) for p in pixels.split(bs)]))
            seconds, extra = build_once(img_dir, tmp / "index-images", embedder, bs)
            passes["e2e_img"].append(seconds)
            extra_mb.append(extra)
            if texts:
                passes["raw_txt"].append(timed_s(lambda: [embedder.embed_texts(c) for c in text_chunks]))
                seconds, extra = build_once(txt_dir, tmp / "index-texts", embedder, bs)
                passes["e2e_txt"].append(seconds)
                extra_mb.append(extra)

    def rate(name: str, count: int) -> float | None:
        return count / statistics.median(passes[name]) if passes[name] else None

    result: dict[str, object] = {
        "raw_img_per_s": rate("raw_img", len(files)),
        "e2e_img_per_s": rate("e2e_img", len(files)),
        "raw_txt_per_s": rate("raw_txt", len(texts)),
        "e2e_txt_per_s": rate("e2e_txt", len(texts)),
    }
    result["img_ratio"] = result["e2e_img_per_s"] / result["raw_img_per_s"]
    result["txt_ratio"] = result["e2e_txt_per_s"] / result["raw_txt_per_s"] if texts else None
    # ru_maxrss is in KiB on Linux: the whole run's peak, models and pre-decoded pixels included.
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["build_extra_rss_mb"] = max(extra_mb)
    result.update(images=len(files), texts=len(texts), batch_size=bs, threads=torch.get_num_threads())
    result["aligner_id"] = embedder.aligner_id

    print(f"{len(files)} images, {len(texts)} captions, batch {bs}, {torch.get_num_threads()} torch threads, "
          f"{args.repeats} rounds; peak RSS {result['peak_rss_mb']:.0f} MB, a build adds at most "
          f"{result['build_extra_rss_mb']:.0f} MB")  # fmt: skip
    rows = [
        {"kind": kind, "items": n, "raw_per_s": result[f"raw_{k}_per_s"],
         "e2e_per_s": result[f"e2e_{k}_per_s"], "e2e_over_raw": result[f"{k}_ratio"]}
        for kind, k, n in (("image", "img", len(files)), ("text", "txt", len(texts)))
    ]  # fmt: skip
    print_table(rows, ("kind", "items", "raw_per_s", "e2e_per_s", "e2e_over_raw"))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
