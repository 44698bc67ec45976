"""Local paths and `s3://` URIs behind one pyarrow filesystem interface.

S3 endpoint, region and credentials come from the standard AWS environment (`AWS_ENDPOINT_URL`, `AWS_REGION`,
`AWS_ACCESS_KEY_ID`, ...). `AWS_ENDPOINT_URL` is passed as `endpoint_override` explicitly because not every pyarrow
code path reads it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pyarrow.fs as pafs


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3 filesystem configured from the standard AWS environment variables."""
    kwargs: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        if endpoint.startswith("http://"):
            kwargs["scheme"] = "http"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path inside it) for a local path, `file://` or `s3://` URI."""
    if uri.startswith("s3://"):
        return s3_filesystem(), uri.removeprefix("s3://").rstrip("/")
    if uri.startswith("file://"):
        uri = uri.removeprefix("file://")
    if is_remote(uri):
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or URI with `/`."""
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def is_empty_dir(uri: str) -> bool:
    """True when `uri` does not exist or is a directory with nothing in it."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return True
    if info.type != pafs.FileType.Directory:
        return False
    return not fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file, atomically: readers see the old content or the new, never a torn file (object stores
    publish an upload only when it completes; a local file is written aside and renamed over)."""
    fs, path = resolve(uri)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    local = isinstance(fs, pafs.LocalFileSystem)
    target = f"{path}.tmp-{os.getpid()}" if local else path
    with fs.open_output_stream(target) as f:
        f.write(data)
    if local:
        os.replace(target, path)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri).decode("utf-8"))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode("utf-8"))


def delete_dir(uri: str) -> None:
    """Delete a directory and everything under it; a missing directory is fine."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Every file under `uri` (recursive) whose name ends in `suffix`, as full URIs, sorted."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    prefix = "s3://" if uri.startswith("s3://") else ""
    return sorted(
        prefix + info.path
        for info in infos
        if info.type == pafs.FileType.File and info.path.endswith(suffix)
    )
