"""A real S3-compatible server for tests: moto's standalone server (`python -m moto.server`, from the
`moto[s3]` dev dependency) on a free 127.0.0.1 port, one bucket, and the standard AWS_* environment
that points the code under test at it. The server is a subprocess, killed by pid afterwards.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs

import proc_util

BUCKET = "influcoder-test"
# Long, unique values: if any of them shows up in a manifest or a log, it leaked from the environment.
KEY_ID = "AKIDTESTOBJSTORE7F3Q"
SECRET = "s3cr3t-Zq81vNw0-objectstore-test-Kx5"
REGION = "us-east-1"


@contextlib.contextmanager
def moto_server(log_path: Path) -> Iterator[dict]:
    """{'endpoint': 'http://127.0.0.1:PORT', 'env': the AWS_* variables} while the server runs."""
    port = proc_util.free_port()
    endpoint = f"http://127.0.0.1:{port}"
    tag = proc_util.new_tag()
    log = open(log_path, "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, proc_util.TAG: tag},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=2)
                break
            except urllib.error.HTTPError:
                break  # it answers
            except OSError:
                assert server.poll() is None, f"moto server exited; see {log_path}"
                assert time.monotonic() < deadline, "moto server did not answer within 60 s"
                time.sleep(0.3)
        client(endpoint, allow_bucket_creation=True).create_dir(BUCKET)
        yield {
            "endpoint": endpoint,
            "env": {
                "AWS_ENDPOINT_URL": endpoint,
                "AWS_ACCESS_KEY_ID": KEY_ID,
                "AWS_SECRET_ACCESS_KEY": SECRET,
                "AWS_REGION": REGION,
            },
        }
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        proc_util.kill_tagged(tag)
        log.close()


def client(endpoint: str, **kw) -> pafs.S3FileSystem:
    """The tests' own client: explicit settings, so assertions never depend on the code under test."""
    return pafs.S3FileSystem(
        access_key=KEY_ID, secret_key=SECRET, region=REGION, endpoint_override=endpoint, scheme="http", **kw
    )


def keys(endpoint: str, prefix: str) -> list[str]:
    """Object keys (files) under s3://BUCKET/prefix, relative to it."""
    infos = client(endpoint).get_file_info(
        pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True)
    )
    return sorted(i.path[len(f"{BUCKET}/{prefix}/") :] for i in infos if i.type == pafs.FileType.File)


def read(endpoint: str, key: str) -> bytes:
    with client(endpoint).open_input_stream(f"{BUCKET}/{key}") as f:
        return f.read()


def upload(endpoint: str, local_dir: Path, prefix: str) -> str:
    """Copy a local folder to s3://BUCKET/prefix; returns that URI."""
    pafs.copy_files(
        str(local_dir),
        f"{BUCKET}/{prefix}",
        source_filesystem=pafs.LocalFileSystem(),
        destination_filesystem=client(endpoint),
    )
    return f"s3://{BUCKET}/{prefix}"


# Installed in every Python process of a job through PYTHONPATH (the driver, Ray's workers): any
# open()/os.makedirs/os.mkdir on an object-store URI (or on the local folder `s3:` that such a call
# makes of it) is recorded and fails. Recorded too, because library code may swallow the exception.
GUARD = r"""
import builtins, io, os, re, traceback

_LOG = os.environ.get("INFLUCODER_URI_GUARD_LOG")
_URI = re.compile(r"(?:^|/)(?:s3|s3a|gs|gcs|az|abfs)://?")
_open, _makedirs, _mkdir = builtins.open, os.makedirs, os.mkdir


def _note(line):
    with _open(_LOG, "a") as f:
        f.write(line + "\n")


def _check(what, path):
    try:
        p = os.fsdecode(path)
    except TypeError:
        return
    if _URI.search(p):
        _note(f"VIOLATION {what}({p!r}) in pid {os.getpid()}:\n" + "".join(traceback.format_stack(limit=9)[:-1]))
        raise OSError(f"URI guard: {what} received {p!r}")


def _guarded(what, fn):
    def wrapper(path, *a, **kw):
        _check(what, path)
        return fn(path, *a, **kw)
    return wrapper


if _LOG:
    builtins.open = io.open = _guarded("open", _open)
    os.makedirs = _guarded("os.makedirs", _makedirs)
    os.mkdir = _guarded("os.mkdir", _mkdir)
    _note(f"loaded in pid {os.getpid()}")
"""


VIOLATION = "VIOLATION"  # how the guard's log marks a URI handed to open()/os.makedirs/os.mkdir


def guard_dir(root: Path) -> Path:
    """A folder holding the guard as `sitecustomize.py`: put it first on PYTHONPATH."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "sitecustomize.py").write_text(GUARD)
    return root
