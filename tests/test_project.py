"""The project's promises: pinned requirements, CI runs the README command, offline engine, make run."""

import ast
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def requirement_lines(name: str) -> list[str]:
    lines = (ROOT / name).read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith(("#", "-r"))]


@pytest.mark.parametrize("name", ["requirements.txt", "requirements-dev.txt"])
def test_every_requirement_is_pinned_exactly(name):
    lines = requirement_lines(name)
    assert lines
    unpinned = [ln for ln in lines if not re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][\w.]*", ln)]
    assert not unpinned, f"unpinned requirements in {name}: {unpinned}"


def test_torch_pins_are_the_builds_installable_offline():
    lines = requirement_lines("requirements.txt")
    assert "torch==2.14.1" in lines and "torchvision==0.29.1" in lines


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"^make test$", ci, re.M)
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "make run" in quick_start and "make test" in quick_start


def test_engine_never_imports_streamlit():
    offenders = []
    for path in (ROOT / "visions_core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "streamlit"]
    assert not offenders


def test_no_code_reaches_for_a_model_hub():
    pattern = re.compile(r"hf_hub_download|snapshot_download|torch\.hub\.|pretrained=True|urlretrieve")
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in ROOT.rglob("*.py")
        if ".venv" not in p.parts and p.parent.name != "tests"
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits


def test_importing_the_engine_forces_offline_mode():
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_HUB_OFFLINE"] = "0"
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, visions_core; e = os.environ; print(e['HF_HUB_OFFLINE'], e['TRANSFORMERS_OFFLINE'])",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["1", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_make_run_serves_the_app_on_localhost():
    port = free_port()
    proc = subprocess.Popen(
        ["make", "run", f"PORT={port}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    assert r.read().decode().strip() == "ok"
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode(errors="replace")
                assert time.monotonic() < deadline, "the app did not come up within two minutes"
                time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            page = r.read().decode()
        assert r.status == 200 and "<title>" in page
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
