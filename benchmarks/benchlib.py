"""Helpers shared by the benchmark scripts: timing on a noisy machine, RSS, real inputs, tables."""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the scripts run as plain files from a checkout

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

FLICKR_DIR = Path(os.environ.get("VISIONS_FLICKR8K", ROOT.parent / "shared" / "data" / "flickr8k"))
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def interleaved_ms(fns: Mapping[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median ms per contender, called in turn each round so load changes on the machine hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm caches, memory maps and thread pools
    names = list(fns)
    for round_ in range(repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1000 for name, t in times.items()}


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MB, from /proc/self/status."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux clear_refs); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


def image_files(folder: Path, limit: int) -> list[Path]:
    """The first `limit` image files of a folder, by name (sorted, so runs compare the same files)."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return files[:limit]


def captions(tsv: Path, limit: int) -> list[str]:
    """Up to `limit` captions from a Flickr8k-style captions.tsv (image, caption_index, caption)."""
    found: list[str] = []
    with tsv.open(encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            if len(found) >= limit:
                break
            found.append(row["caption"])
    return found


def fmt(value: object) -> str:
    """A table cell: floats with two decimals, None as '-'."""
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def print_table(rows: Sequence[Mapping[str, object]], cols: Sequence[str]) -> None:
    """Right-aligned plain-text table of the given columns."""
    cells = [[fmt(row.get(c)) for c in cols] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))


def parser_with_inputs(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with the --images and --captions options of the model benchmarks."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=FLICKR_DIR / "images", help="folder of real images")
    parser.add_argument("--captions", type=Path, default=FLICKR_DIR / "captions.tsv", help="captions.tsv")
    return parser
