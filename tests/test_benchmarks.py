"""Smoke tests of benchmarks/: each script runs with --quick and ends with one JSON line of the agreed keys.

Timings are never asserted (the machine is shared); what is checked is that the numbers exist, are positive
and consistent with each other, and that the index's top-10 agrees with the numpy baseline's.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

SEARCH_KEYS = {
    "n", "index_ms", "numpy_ms", "faiss_ms", "index_over_numpy", "index_over_faiss",
    "search_rss_over_vector_bytes",
}  # fmt: skip
INDEX_KEYS = {"raw_img_per_s", "e2e_img_per_s", "img_ratio", "raw_txt_per_s", "e2e_txt_per_s", "txt_ratio",
              "peak_rss_mb"}  # fmt: skip


def last_json(stdout: str) -> dict:
    """The JSON object on the last printed line."""
    return json.loads(stdout.strip().splitlines()[-1])


def positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_bench_search_quick_runs_as_a_script_and_agrees_with_numpy(tmp_path):
    script = BENCH_DIR / "bench_search.py"
    out = subprocess.run(
        [sys.executable, str(script), "--quick", "--dim", "64", "--tmp-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    results = last_json(out.stdout)["results"]
    assert [r["n"] for r in results] == [2_000, 10_000]
    for row in results:
        assert row.keys() >= SEARCH_KEYS
        assert all(positive(row[k]) for k in SEARCH_KEYS)
        assert row["index_over_numpy"] == pytest.approx(row["index_ms"] / row["numpy_ms"])
        assert row["same_top10"] is True
        # The child process maps the whole index, so its peak RSS covers at least the vectors it scanned.
        assert row["search_peak_rss_mb"] * 2**20 >= row["n"] * 64 * 4
    assert list(tmp_path.iterdir()) == []  # the temporary indexes are removed


def test_bench_search_compares_bucket_sizes(capsys, tmp_path):
    import bench_search

    assert bench_search.main(["--max-n", "3000", "--quick", "--dim", "32", "--bucket-sizes", "512,4096",
                              "--tmp-dir", str(tmp_path)]) == 0  # fmt: skip
    results = last_json(capsys.readouterr().out)["results"]
    assert [(r["n"], r["bucket_size"]) for r in results] == [(2_000, 512), (2_000, 4096)]
    assert all(r["same_top10"] for r in results)


@pytest.mark.flickr
@pytest.mark.slow
def test_bench_index_quick_reports_rates_and_ratios(embedder, flickr_dir, capsys):
    import bench_index

    argv = ["--quick", "--images", str(flickr_dir / "images"), "--captions", str(flickr_dir / "captions.tsv")]
    assert bench_index.main(argv) == 0
    result = last_json(capsys.readouterr().out)
    assert result.keys() >= INDEX_KEYS
    assert all(positive(result[k]) for k in INDEX_KEYS)
    assert result["img_ratio"] == pytest.approx(result["e2e_img_per_s"] / result["raw_img_per_s"])
    assert result["txt_ratio"] == pytest.approx(result["e2e_txt_per_s"] / result["raw_txt_per_s"])
    assert (result["images"], result["texts"]) == (8, 32)
    assert result["aligner_id"] == embedder.aligner_id


@pytest.mark.flickr
@pytest.mark.slow
def test_bench_encoders_quick_recipes_match_eager(flickr_dir, capsys):
    import bench_encoders

    argv = ["--quick", "--images", str(flickr_dir / "images"), "--captions", str(flickr_dir / "captions.tsv")]
    assert bench_encoders.main(argv) == 0
    results = last_json(capsys.readouterr().out)["results"]
    by_name = {(r["encoder"], r["recipe"]): r for r in results}
    assert by_name[("image", "eager fp32")]["speedup"] == pytest.approx(1.0)
    assert all(positive(r["per_s"]) for r in results)
    # Graph rewrites must not change what the image encoder computes.
    assert by_name[("image", "jit trace+freeze")]["min_cos"] > 0.9999
    assert by_name[("image", "channels_last")]["min_cos"] > 0.9999
