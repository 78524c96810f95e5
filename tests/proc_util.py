"""Process helpers for tests that start Ray processes or kill them on purpose.

`ray stop` kills every Ray process on the machine (it matches process names), including other
users' and other test sessions' clusters, so tests never call it. Instead every process a test
starts carries an environment marker (`INFLUCODER_TEST_TAG=<uuid>`), inherited by everything Ray
spawns from it (GCS, raylets, agents, workers, job drivers); cleanup kills exactly those, by pid,
SIGTERM first and SIGKILL after a grace period (some Ray agents ignore SIGTERM: STACK.md pitfall 10).
"""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid

import psutil

TAG = "INFLUCODER_TEST_TAG"


def new_tag() -> str:
    return uuid.uuid4().hex


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tagged(tag: str) -> list[psutil.Process]:
    """Live processes whose environment carries this tag (never the caller itself)."""
    out = []
    for p in psutil.process_iter():
        if p.pid == os.getpid():
            continue
        try:
            if p.environ().get(TAG) == tag and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.Error, OSError):
            continue
    return out


def kill_tagged(tag: str, grace: float = 5.0) -> list[int]:
    """Terminate every process with the tag; returns the pids that needed SIGKILL."""
    procs = tagged(tag)
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    return [p.pid for p in alive]


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def find_worker(root_pid: int, title_fragment: str) -> psutil.Process | None:
    """A Ray worker under `root_pid` whose process title contains `title_fragment` (e.g. SketchActor)."""
    for p in descendants(root_pid):
        try:
            if title_fragment in " ".join(p.cmdline()):
                return p
        except psutil.Error:
            continue
    return None


def wait_for(cond, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def run_as_a_user(job_path, timeout: float = 600, env_extra: dict | None = None, drop_env: tuple = ()) -> dict:
    """`influcoder run JOB` in its own process, as a user starts it (its own Ray, no terminal):
    {'rc', 'stdout', 'stderr', 'session_logs'} (the text of Ray's session log and record files).
    `env_extra` is added to this process's environment, less the variables starting with a `drop_env`
    prefix. Every process it starts carries a tag and is killed by pid afterwards."""
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    tag = new_tag()
    drop = ("RAY_ADDRESS", "RAY_DATA_DISABLE_PROGRESS_BARS")
    env = {k: v for k, v in os.environ.items() if k not in drop and not (drop_env and k.startswith(drop_env))}
    env.update({TAG: tag, "RAY_TMPDIR": tempfile.mkdtemp(prefix="icrun", dir="/tmp"), **(env_extra or {})})
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "run", str(job_path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        session_logs = "".join(
            p.read_text(errors="replace")
            for p in Path(env["RAY_TMPDIR"]).rglob("*")
            if p.is_file() and p.suffix in (".out", ".err", ".log", ".json", ".txt")
        )
    finally:
        kill_tagged(tag)
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    return {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr, "session_logs": session_logs}
