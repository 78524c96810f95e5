"""The Bergson peer of bench/bench_sketch.py: it says why it did not run, and it is never the project's.

Bergson lives only in the bench-only bench/.peer-venv (bench/peers/install_bergson.sh); the project's
interpreter must not import it, and a bench without a working peer reports a reason, never a figure.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench_sketch():
    sys.path.insert(0, str(REPO / "bench"))  # bench_sketch imports its sibling `common`
    try:
        import bench_sketch

        yield bench_sketch
    finally:
        sys.path.remove(str(REPO / "bench"))


def test_no_interpreter_gives_a_reason_and_the_install_command(bench_sketch):
    version, why = bench_sketch.bergson_probe(None)
    assert version is None
    assert why.startswith("not run") and "install_bergson.sh" in why and "--bergson-python" in why


def test_project_interpreter_does_not_have_bergson(bench_sketch):
    # The project's own venv must fail the probe: Bergson is a bench-only peer, never a dependency.
    version, why = bench_sketch.bergson_probe(sys.executable)
    assert version is None
    assert why.startswith("not run") and "import bergson" in why and "No module named 'bergson'" in why


def test_missing_interpreter_is_reported(bench_sketch, tmp_path):
    version, why = bench_sketch.bergson_probe(str(tmp_path / "no-such-python"))
    assert version is None and why.startswith("not run") and "could not be started" in why


def test_install_script_keeps_the_peer_out_of_the_project():
    script = (REPO / "bench" / "peers" / "install_bergson.sh").read_text()
    assert "bench/.peer-venv" in script and ".venv/bin" not in script.replace(".peer-venv/bin", "")
    assert "bergson" not in (REPO / "pyproject.toml").read_text().lower()
    assert "bench/.peer-venv" in (REPO / ".gitignore").read_text()
