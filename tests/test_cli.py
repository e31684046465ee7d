"""The command line: build_index and infer in-process (main(argv)) and as processes; errors; a kill."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_generated_image

from visions_core.cli import build_parser, main
from visions_core.index import FlatIndex

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def ranked(out: str) -> list[tuple[str, float]]:
    """The 'path score' lines of infer's output (the JSON line, if any, left out)."""
    lines = [ln for ln in out.splitlines() if ln and not ln.startswith("[")]
    return [(path, float(score)) for path, score in (ln.rsplit(" ", 1) for ln in lines)]


@pytest.fixture
def built(generated_dataset, embedder, capsys) -> Path:
    """generated_dataset with its index built through the CLI."""
    code, out, _ = run(capsys, "build_index", "--data_dir", generated_dataset, "--flat_bucket_size", "4")
    assert code == 0, out
    return generated_dataset


@pytest.mark.parametrize("command", [[], ["build_index"], ["infer"]])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: visions")
    for option in {
        "build_index": ["--data_dir", "--append", "--rebuild"],
        "infer": ["--query_text", "--json"],
    }.get(command[0] if command else "", ["build_index", "infer"]):
        assert option in out


def test_help_is_instant_because_no_model_library_is_imported():
    code = (
        "import sys; from visions_core.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    )
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert time.perf_counter() - started < 5


def test_build_prints_a_summary_and_refuses_to_overwrite_without_a_mode(built, capsys):
    with FlatIndex.open(built / "index") as index:
        assert len(index) == 12 and index.bucket_size == 4
    code, out, err = run(capsys, "build_index", "--data_path", built)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "--append" in err and "--rebuild" in err and "Traceback" not in err
    code, out, _ = run(capsys, "build_index", "--data_dir", built, "--append")
    assert code == 0 and out.startswith("added 0, updated 0, already present 12, skipped 0 in ")


def test_build_summary_counts_skips_per_reason_and_verbose_lists_the_files(
    generated_dataset, embedder, capsys
):
    (generated_dataset / "empty.txt").write_bytes(b"")
    (generated_dataset / "blank.txt").write_bytes(b"   \n")
    (generated_dataset / "junk.bin").write_bytes(bytes(range(256)))
    (generated_dataset / "also_empty.png").write_bytes(b"")
    code, out, _ = run(capsys, "build_index", "--data_dir", generated_dataset)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("added 12, updated 0, already present 0, skipped 4 in ")
    assert lines[1] == (
        "skipped: 2 empty file, 1 empty text, 1 not an image or text (--verbose lists the files)"
    )
    code, out, _ = run(capsys, "build_index", "--data_dir", generated_dataset, "--rebuild", "--verbose")
    assert code == 0
    assert out.splitlines()[2:] == [
        "  also_empty.png: empty file",
        "  blank.txt: empty text (only whitespace)",
        "  empty.txt: empty file",
        "  junk.bin: not an image or text",
    ]


def test_recursive_build_reads_sub_folders_and_a_second_builder_is_told_the_index_is_locked(
    generated_dataset, embedder, capsys
):
    (generated_dataset / "sub" / "deeper").mkdir(parents=True)
    (generated_dataset / "sub" / "deeper" / "note.txt").write_text("A note in a nested folder.")
    code, out, _ = run(capsys, "build_index", "--data_dir", generated_dataset)
    assert code == 0 and out.startswith("added 12,")
    code, out, _ = run(capsys, "build_index", "--data_dir", generated_dataset, "--append", "--recursive")
    assert code == 0 and out.startswith("added 1, updated 0, already present 12,")
    with FlatIndex.open(generated_dataset / "index", writable=True):
        code, out, err = run(capsys, "build_index", "--data_dir", generated_dataset, "--rebuild")
    assert code == 1 and out == "" and err.startswith("error: index is locked by pid ")
    with FlatIndex.open(generated_dataset / "index") as index:
        assert len(index) == 13 and index.contains_path("sub/deeper/note.txt")


def test_infer_by_text_prints_path_score_lines_and_json_last(built, embedder, capsys):
    code, out, _ = run(
        capsys, "infer", "--index_path", built / "index", "--query_text", "a dog", "-n", "5", "--json"
    )
    assert code == 0
    rows = json.loads(out.splitlines()[-1])
    assert len(rows) == 5 and all(set(r) == {"id", "path", "score", "kind"} for r in rows)
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    assert [(p, round(s, 4)) for p, s in ranked(out)] == [(r["path"], round(r["score"], 4)) for r in rows]
    with FlatIndex.open(built / "index") as index:
        expected = index.search(embedder.embed_texts(["a dog"])[0], 5)
    assert [r["id"] for r in rows] == [r.id for r in expected]


def test_infer_by_index_id_lists_the_item_first_unless_excluded(built, capsys):
    code, out, _ = run(capsys, "infer", "--index_path", built / "index", "--query_index_id", "6", "--json")
    rows = json.loads(out.splitlines()[-1])
    assert code == 0 and len(rows) == 10
    assert rows[0]["id"] == 6 and rows[0]["score"] == pytest.approx(1.0, abs=1e-4)
    code, out, _ = run(
        capsys, "infer", "--index_path", built / "index", "--query_index_id", "6", "--exclude_self", "--json"
    )
    rows_without = json.loads(out.splitlines()[-1])
    assert 6 not in [r["id"] for r in rows_without]
    assert [r["id"] for r in rows_without[:9]] == [r["id"] for r in rows[1:]]


def test_infer_by_path_finds_the_file_itself_unless_excluded(built, capsys):
    query = built / "img_05.png"
    code, out, _ = run(capsys, "infer", "--index_path", built / "index", "--query_path", query, "-n", "3")
    assert code == 0
    (top, score), *_ = ranked(out)
    assert top == "img_05.png" and score == pytest.approx(1.0, abs=1e-3)
    code, out, _ = run(
        capsys, "infer", "--index_path", built / "index", "--query_path", query, "-n", "3", "--exclude_self"
    )
    assert code == 0 and "img_05.png" not in [p for p, _ in ranked(out)] and len(ranked(out)) == 3


def test_infer_by_an_item_folder_of_a_mixed_index(flickr_mixed_dataset, embedder, capsys):
    code, _, _ = run(
        capsys, "build_index", "--data_dir", flickr_mixed_dataset, "--data_reader_type", "mixed_dir"
    )
    assert code == 0
    code, out, _ = run(
        capsys,
        "infer",
        "--index_path",
        flickr_mixed_dataset / "index",
        "--query_path",
        flickr_mixed_dataset / "item_3",
        "--data_reader_type",
        "simple_dir",
        "--json",
    )
    rows = json.loads(out.splitlines()[-1])
    assert code == 0 and (rows[0]["path"], rows[0]["kind"]) == ("item_3", "mixed")
    assert rows[0]["score"] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["build_index", "--data_dir", "{tmp}/missing"],
            "error: data directory {tmp}/missing does not exist",
        ),
        (["infer", "--index_path", "{tmp}/none", "--query_text", "x"], "error: no index at {tmp}/none"),
        (["infer", "--index_path", "{index}", "--query_index_id", "99"], "error: no item with id 99"),
        (
            ["infer", "--index_path", "{index}", "--query_path", "{tmp}/nope.jpg"],
            "error: {tmp}/nope.jpg: no such",
        ),
        (["infer", "--index_path", "{index}", "--query_text", "  "], "error: the query text is empty"),
    ],
)
def test_user_mistakes_are_one_line_errors_with_a_non_zero_exit(built, tmp_path, capsys, argv, message):
    fill = {"tmp": str(tmp_path), "index": str(built / "index")}
    code, out, err = run(capsys, *(a.format(**fill) for a in argv))
    assert code == 1 and out == ""
    assert err.startswith(message.format(**fill)) and err.count("\n") == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["build_index"],
        ["build_index", "--data_dir", "d", "--append", "--rebuild"],
        ["build_index", "--data_dir", "d", "--data_reader_type", "zip_dir"],
        ["build_index", "--data_dir", "d", "--batch_size", "0"],
        ["infer", "--index_path", "i"],
        ["infer", "--index_path", "i", "--query_text", "a", "--query_index_id", "1"],
        ["infer", "--index_path", "i", "--query_index_id", "-1"],
        ["launch"],
    ],
)
def test_malformed_commands_exit_2_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert "usage: visions" in capsys.readouterr().err


def python(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, **kwargs
    )


def test_main_py_and_python_m_run_the_same_program_end_to_end(generated_dataset, tmp_path):
    index = tmp_path / "elsewhere" / "index"
    built = python("main.py", "build_index", "--data_dir", str(generated_dataset), "--index_path", str(index))
    assert built.returncode == 0, built.stderr
    assert built.stdout.startswith("added 12, updated 0, already present 0, skipped 0")
    assert "items/s" in built.stderr  # the tqdm progress bar
    found = python(
        "-m", "visions_core", "infer", "--index_path", str(index), "--query_index_id", "0", "--json"
    )
    assert found.returncode == 0, found.stderr
    rows = json.loads(found.stdout.splitlines()[-1])
    assert rows[0]["id"] == 0 and len(rows) == 10
    again = python(
        "-m", "visions_core", "build_index", "--data_dir", str(generated_dataset), "--index_path", str(index)
    )
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert again.stderr.strip().endswith("or with --rebuild to start over.")


@pytest.mark.slow
def test_a_build_killed_with_sigkill_resumes_with_append_without_duplicates(tmp_path):
    data = tmp_path / "many"
    for i in range(80):
        write_generated_image(data / f"img_{i:03d}.png", seed=100 + i, size=(48, 40))
    index_path = data / "index"
    proc = subprocess.Popen(
        [sys.executable, "main.py", "build_index", "--data_dir", str(data), "--batch_size", "2"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        committed = 0
        while committed < 6:
            assert proc.poll() is None, "the build ended before it could be killed"
            assert time.monotonic() < deadline
            if FlatIndex.exists(index_path):
                with FlatIndex.open(index_path) as reader:
                    committed = len(reader)
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    with FlatIndex.open(index_path) as index:
        killed_at = len(index)
        records = index.records()
        assert 6 <= killed_at < 80
        assert [r["id"] for r in records] == list(range(killed_at))
        assert len({r["path"] for r in records}) == killed_at
        index.get_vector(killed_at - 1)  # metadata and vectors agree up to the last committed row
    resumed = python("main.py", "build_index", "--data_dir", str(data), "--append", timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    expected = f"added {80 - killed_at}, updated 0, already present {killed_at}, skipped 0"
    assert resumed.stdout.startswith(expected)
    with FlatIndex.open(index_path) as index:
        paths = [r["path"] for r in index.records()]
    assert len(paths) == 80 and sorted(paths) == sorted(p.name for p in data.glob("*.png"))
