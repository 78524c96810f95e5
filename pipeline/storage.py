"""Paths that may be local or URIs (s3://, gs://, file://, …) through pyarrow filesystems.

Every path in a job goes through here so that one machine (local paths) and a cluster with
shared object storage (URIs) run the same code. Credentials embedded in URIs are redacted
before anything is logged or written to a manifest.

Object stores get their credentials and endpoint from the standard environment chain of each
library (pyarrow's S3 client, Lance's object_store): `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL` (a self-hosted or local S3 server), or an
instance profile / `GOOGLE_APPLICATION_CREDENTIALS`. Nothing here reads or records their values.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import uuid
from typing import Any, Iterator

import pyarrow.fs as pafs

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_CREDENTIALS_IN_URI = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_SECRET_QUERY = re.compile(
    r"(?i)([?&](?:access_key|secret_key|secret|token|session_token|sig|signature|password|api_key|apikey"
    r"|x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|x-goog-credential)=)[^&\s]+"
)


def is_uri(path: str) -> bool:
    return bool(_URI.match(path)) and not path.startswith("file://")


# Credentials the object-store clients read from the environment: their values are scrubbed from any
# text redact() sees too (an error message of a client library may quote them).
SECRET_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "GOOGLE_APPLICATION_CREDENTIALS_JSON",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
)


def redact(text: str) -> str:
    """Remove credentials from URIs (user:secret@host, ?secret=...) and the values of the credential
    environment variables (SECRET_ENV) from any string."""
    text = _CREDENTIALS_IN_URI.sub(r"\g<scheme>***@", text)
    text = _SECRET_QUERY.sub(r"\1***", text)
    for name in SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= 8 and value in text:  # shorter values would blot out ordinary words
            text = text.replace(value, "***")
    return text


def redact_obj(obj: Any) -> Any:
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact_obj(v) for v in obj]
    return obj


def join(base: str, *parts: str) -> str:
    if is_uri(base):
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return os.path.join(base, *parts)


def local_path(path: str) -> str:
    """A local path (a `file://` URI stripped). An object-store URI is a bug in the caller: such paths
    go through `filesystem()`, never through open()/os.*, which would make a local folder named `s3:`."""
    if is_uri(path):
        raise ValueError(f"internal error: local-only file access on {redact(path)}; use pipeline.storage")
    return path[len("file://") :] if path.startswith("file://") else path


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) for a local path or a URI."""
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(local_path(path))


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def is_dir(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.get_file_info(p).type == pafs.FileType.Directory


def makedirs(path: str) -> None:
    fs, p = filesystem(path)
    fs.create_dir(p, recursive=True)


def read_text(path: str) -> str:
    fs, p = filesystem(path)
    with fs.open_input_stream(p) as f:
        return f.read().decode()


def write_text_atomic(path: str, text: str) -> None:
    """Write a small file so readers see the old content or the new, never a torn one."""
    fs, p = filesystem(path)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(p), exist_ok=True)
        tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    else:  # object stores: a single PUT is atomic
        with fs.open_output_stream(p) as f:
            f.write(text.encode())


def read_json(path: str) -> Any:
    return json.loads(read_text(path))


def write_json_atomic(path: str, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_table(path: str, columns: list[str] | None = None):
    """A Parquet file or folder (local or URI) as one Arrow table."""
    import pyarrow.parquet as pq

    fs, p = filesystem(path)
    return pq.read_table(p, columns=columns, filesystem=fs)


def download_dir(path: str, local_dir: str) -> None:
    """Copy a folder (local or URI) into a local folder, recursively."""
    fs, p = filesystem(path)
    pafs.copy_files(p, local_dir, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def upload_dir(local_dir: str, path: str) -> None:
    """Copy a local folder to `path` (local or URI), recursively."""
    fs, p = filesystem(path)
    pafs.copy_files(local_dir, p, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def listing_fingerprint(path: str) -> str:
    """A cheap fingerprint of a folder's files (relative name, size, modification time), one listing
    call: keys a local copy of a remote folder, which changes whenever any file is rewritten."""
    import hashlib

    fs, p = filesystem(path)
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=True))
    files = sorted(
        (i.path[len(p) :].lstrip("/"), i.size, i.mtime_ns or 0) for i in infos if i.type == pafs.FileType.File
    )
    return hashlib.sha256(json.dumps([path.rstrip("/"), files]).encode()).hexdigest()[:16]


def lance_storage_options(uri: str) -> dict[str, str]:
    """Options for Lance/LanceDB at `uri`. Credentials, region and endpoint come from Lance's own
    environment chain (`AWS_*`); only plain-http endpoints (a local or in-cluster S3 server) need
    saying, as `AWS_ALLOW_HTTP=true` would: pyarrow accepts them from `AWS_ENDPOINT_URL` alone."""
    if not is_uri(uri):
        return {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    if uri.startswith("s3://") and endpoint.startswith("http://"):
        return {"allow_http": "true"}
    return {}


def delete_dir(path: str) -> None:
    fs, p = filesystem(path)
    if fs.get_file_info(p).type != pafs.FileType.NotFound:
        fs.delete_dir(p)


def move(src: str, dst: str) -> None:
    fs, s = filesystem(src)
    _, d = filesystem(dst)
    fs.move(s, d)


def list_files(path: str, suffix: str = "") -> list[str]:
    """Sorted files directly under a directory (URI-preserving)."""
    fs, p = filesystem(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=False))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix))
    return [join(path, n) for n in names]


@contextlib.contextmanager
def exclusive_lock(lock_path: str, what: str) -> Iterator[None]:
    """Hold an exclusive lock so that only one process writes `what` at a time.

    Local paths use `fcntl.flock` (released by the kernel if the holder dies, so a crash never
    leaves a stale lock). A second writer waits, then sees the first one's finished work.
    Object stores have no lock that a crashed holder releases (a lock object left by a killed job
    would block the run_dir until someone deletes it by hand), so there this is a no-op: one job
    per URI run_dir at a time (README, "Running on a cluster"). What stays safe without it: a stage
    counts as finished only once its manifest exists, and LanceDB commits are atomic per version.
    """
    if is_uri(lock_path):
        yield
        return
    import fcntl

    path = os.path.abspath(local_path(lock_path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logging.getLogger("influcoder").info("waiting for another influcoder process writing %s", what)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
