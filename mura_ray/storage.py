"""Local paths and `s3://` URIs behind one pyarrow filesystem interface.

S3 endpoint, region and credentials come from the standard AWS environment (`AWS_ENDPOINT_URL`, `AWS_REGION`,
`AWS_ACCESS_KEY_ID`, ...). `AWS_ENDPOINT_URL` is passed as `endpoint_override` explicitly because not every pyarrow
code path reads it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from typing import Any

import pyarrow.fs as pafs

from mura_ray.config import UserError

logger = logging.getLogger(__name__)


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


_AWS_ENVIRONMENT = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
                    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3 filesystem configured from the standard AWS environment variables.

    One per process and environment, reused: each S3FileSystem has its own client and connection pool, and a new
    one per file read (ingest and raw-folder scoring read one object per image) would open a new connection — on
    real S3 a TLS handshake — for every image.
    """
    return _s3_filesystem(tuple(os.environ.get(name) for name in _AWS_ENVIRONMENT))


@functools.lru_cache(maxsize=8)
def _s3_filesystem(environment: tuple[str | None, ...]) -> pafs.S3FileSystem:
    env = dict(zip(_AWS_ENVIRONMENT, environment, strict=True))
    kwargs: dict[str, Any] = {}
    endpoint = env["AWS_ENDPOINT_URL_S3"] or env["AWS_ENDPOINT_URL"]
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        if endpoint.startswith("http://"):
            kwargs["scheme"] = "http"
    region = env["AWS_REGION"] or env["AWS_DEFAULT_REGION"]
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


# pyarrow's S3 errors are OSErrors reading "When <doing> for key 'K' in bucket 'B': AWS Error <TYPE> during <Op>
# operation: <S3's message>", TYPE being the AWS SDK's name for the error, or UNKNOWN (HTTP status N). These types
# (and HTTP 403) are S3 refusing the request: an unknown key, a wrong secret or token, or no permission.
# A HEAD request (a file's or folder's information, the first request of most jobs) gets no error body from S3, so
# even a wrong key or secret is ACCESS_DENIED there. pyarrow raises a plain OSError: the SDK's error type reaches
# Python only in that message, so it is matched there.
_ACCESS_DENIED = re.compile(
    r"AWS Error (?:ACCESS_DENIED|INVALID_ACCESS_KEY_ID|SIGNATURE_DOES_NOT_MATCH|INCOMPLETE_SIGNATURE|INVALID_SIGNATURE"
    r"|INVALID_CLIENT_TOKEN_ID|INVALID_TOKEN|MISSING_AUTHENTICATION_TOKEN|UNRECOGNIZED_CLIENT"
    r"|UNKNOWN \(HTTP status 403\)) during ")
_S3_LOCATION = re.compile(r"(?:key '([^']*)' in )?bucket '([^']+)'")


def _message_line(e: BaseException) -> str:
    """An exception's message's first line (pyarrow's S3 errors say what failed there), or ""."""
    return (str(e).strip().splitlines() or [""])[0]


def access_denied(e: BaseException) -> str | None:
    """For an S3 request refused for its credentials or permissions (pyarrow's OSError `... AWS Error ACCESS_DENIED
    during HeadObject operation: ...`, INVALID_ACCESS_KEY_ID, SIGNATURE_DOES_NOT_MATCH, ...): one line that says so
    and what to check, then pyarrow's own first line. None for any other error."""
    line = _message_line(e)
    if not isinstance(e, OSError) or not _ACCESS_DENIED.search(line):
        return None
    return f"access denied (check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the bucket policy): {line}"


# The AWS SDK's NETWORK_CONNECTION (curl could not resolve the host, connect, or timed out, after the SDK's retries):
# the endpoint, not the request, is the problem.
_UNREACHABLE = re.compile(r"AWS Error NETWORK_CONNECTION during ")


def unreachable(e: BaseException) -> str | None:
    """For an S3 request that never got an answer (pyarrow's OSError `... AWS Error NETWORK_CONNECTION during
    HeadObject operation: curlCode: 7, Could not connect to server ...`): one line that says so and where the
    endpoint comes from, then pyarrow's own first line. None for any other error."""
    line = _message_line(e)
    if not isinstance(e, OSError) or not _UNREACHABLE.search(line):
        return None
    variable = next((v for v in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL") if os.environ.get(v)), None)
    where = (f"the S3 endpoint {os.environ[variable]} ({variable})" if variable else
             "S3 (no AWS_ENDPOINT_URL set: AWS's)")
    return f"cannot reach {where}; check the address and the network: {line}"


# S3 busy or failing (after the AWS SDK's own retries): another try later may well succeed.
_TRANSIENT = re.compile(r"AWS Error (?:NETWORK_CONNECTION|SLOW_DOWN|THROTTLING|SERVICE_UNAVAILABLE|INTERNAL_FAILURE"
                        r"|REQUEST_TIMEOUT|REQUEST_TIME_TOO_SKEWED|UNKNOWN \(HTTP status (?:429|5\d\d)\)) during ")


def transient(e: BaseException) -> bool:
    """Whether an S3 error is the service's or the network's for now (unreachable, throttled, a 5xx), not the
    object's: a later run may read what this one could not."""
    return isinstance(e, OSError) and bool(_TRANSIENT.search(_message_line(e)))


def s3_problem(e: BaseException) -> str | None:
    """`access_denied` or `unreachable`: an S3 error that is the credentials', the permissions' or the endpoint's,
    not the data's; None for any other error."""
    return access_denied(e) or unreachable(e)


def s3_location(e: BaseException) -> str | None:
    """The `s3://bucket/key` a pyarrow S3 error names (`... for key 'K' in bucket 'B': ...`), or None."""
    match = _S3_LOCATION.search(_message_line(e))
    if match is None:
        return None
    key, bucket = match.groups()
    return f"s3://{bucket}/{key.strip('/')}" if key and key.strip("/") else f"s3://{bucket}"


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


def absolute(uri: str) -> str:
    """A local path made absolute (`~` expanded, a `file://` prefix dropped); a URI (`s3://...`) as it is.

    Jobs resolve their local paths on the driver, once: a relative path would otherwise be resolved again in each
    Ray worker's working directory (under `ray job submit --working-dir`, Ray's copy of it), and logged and recorded
    as given rather than as where the data is.
    """
    if is_remote(uri):
        return uri
    return os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))


def contains(outer: str, inner: str) -> bool:
    """Whether `inner` is the folder `outer` or lies anywhere under it. Local paths are compared absolute with
    symbolic links resolved (a link to a folder is that folder); URIs as `scheme://bucket/key` strings, empty path
    segments dropped. A local path and a URI never contain each other."""

    def _key(uri: str) -> str:
        if is_remote(uri):
            scheme, rest = uri.split("://", 1)
            return f"{scheme}://" + "/".join(part for part in rest.split("/") if part)
        return os.path.realpath(absolute(uri))

    a, b = _key(outer), _key(inner)
    return b == a or b.startswith(a.rstrip("/") + "/")


def overlap(a: str, b: str) -> bool:
    """Whether `a` and `b` are the same folder or one lies inside the other (`contains` either way)."""
    return contains(a, b) or contains(b, a)


def check_in_bucket(uri: str, flag: str, example: str) -> None:
    """A job's output folder must lie inside a bucket: `s3://bucket` alone has no parent folder to name a run in."""
    if is_remote(uri) and "/" not in uri.split("://", 1)[1].strip("/"):
        raise UserError(f"{flag} {uri}: give a folder inside the bucket, such as {uri.rstrip('/')}/{example}")


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


def clear_dir(uri: str, keep: tuple[str, ...] = ()) -> None:
    """Delete everything in a directory except the entries named in `keep`; a missing directory is fine."""
    fs, path = resolve(uri)
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True)):
        if info.base_name in keep:
            continue
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(info.path)
        else:
            fs.delete_file(info.path)


PROBE_PREFIX = "_probe-"
"""Name prefix of the file `probe_writable` writes and deletes again (one left behind by a killed run is junk)."""


def probe_writable(uri: str) -> None:
    """Create the folder `uri` and write and delete a small file in it; raises OSError when that fails.

    A job checks its output this way before its long work, so that an output that cannot be written (a path under
    a regular file, a missing bucket, an unreachable endpoint, no permission to write or to delete) fails at once,
    not after hours of work.
    """
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)
    probe = f"{path}/{PROBE_PREFIX}{uuid.uuid4().hex}"
    with fs.open_output_stream(probe) as f:
        f.write(b"probe\n")
    fs.delete_file(probe)


def move(src: str, dst: str) -> None:
    """Move a file, or a folder with everything in it, to `dst` (which must not exist). Locally that is one
    rename; object stores have no rename, so there each object is copied (server-side, no data goes through this
    process) and then deleted, 16 at a time."""
    from concurrent.futures import ThreadPoolExecutor

    fs, src_path = resolve(src)
    _, dst_path = resolve(dst)
    if isinstance(fs, pafs.LocalFileSystem) or fs.get_file_info(src_path).type != pafs.FileType.Directory:
        fs.move(src_path, dst_path)
        return
    files = [i.path for i in fs.get_file_info(pafs.FileSelector(src_path, recursive=True))
             if i.type == pafs.FileType.File]
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda path: fs.move(path, dst_path + path[len(src_path):]), files))
    fs.delete_dir(src_path)


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


def list_parquet(uri: str) -> list[str]:
    """The `.parquet` files under the folder `uri` (recursive, sorted, as full URIs), leaving out every name below
    `uri` that starts with `_` or `.` (staging folders, temporary and hidden files), as pyarrow.dataset, Spark and
    Ray Data do. (pyarrow.dataset's own discovery cannot list a folder that also holds other files: it fails on
    the first one that is not Parquet.)"""
    base = resolve(uri)[1].rstrip("/")
    return [f for f in list_files(uri, ".parquet")
            if not any(part.startswith(("_", ".")) for part in resolve(f)[1][len(base):].split("/"))]


class OutputLock:
    """Keeps a second writer out of an output folder: `FOLDER/_lock.json` names the run that holds it (host, pid,
    start, a random token) and is refreshed every `heartbeat_s` by a background thread.

    A lock not refreshed for `stale_after_s` (the age of the file, by the storage's clock: see `_read`) belongs to a
    run that died without releasing it (a SIGKILLed pod, a lost node) and is taken over with a warning; a run
    stopped by SIGTERM or Ctrl+C releases it on the way out (`runtime.run_main`). A local lock is created atomically
    (`O_EXCL`). pyarrow offers object stores no create-if-absent, so a remote lock is written and read back after
    `settle_s`: of runs that raced past the check, only the last writer finds its own token there, and the others
    stop. The holder re-reads the lock on every refresh and before each commit (`check`): a lock that was taken over
    (its run judged dead) stops it before it writes again.
    """

    NAME = "_lock.json"

    def __init__(self, folder: str, what: str, *, stale_after_s: float = 600.0, heartbeat_s: float = 60.0,
                 settle_s: float = 2.0, name: str = NAME):
        # `name`: the lock file's path in `folder` (jobs/tune.py keeps it in a subfolder, out of Tune's reach)
        self.folder, self.what, self.uri = folder, what, join(folder, name)
        self.stale_after_s, self.heartbeat_s, self.settle_s = stale_after_s, heartbeat_s, settle_s
        self.token = uuid.uuid4().hex
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._held = False
        self._started = time.time()

    def _record(self) -> dict[str, Any]:
        now = time.time()
        return {"holder": self.what, "host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                "started_at": self._started, "heartbeat_at": now}

    def _read(self) -> tuple[dict[str, Any], float] | None:
        """(the lock's record, seconds since it was last refreshed), or None when there is no lock.

        The age is that of the lock file: the reader's clock against the modification time the storage gave it
        when the holder last wrote it (the local kernel, an NFS server, S3 at upload), not against the record's
        `heartbeat_at`, which is the holder's own clock. On a cluster the holder is another host, and a clock a
        few minutes off there would make a live lock look stale (taken over under a running job) or a dead one
        look fresh. The file's age still compares two clocks, but the same two for every holder: the storage's
        (on S3 the provider's, one clock for all readers) and the reader's, the host that decides. `heartbeat_at`
        counts only where the storage reports no modification time.
        """
        try:
            data = read_bytes(self.uri)
        except FileNotFoundError:
            return None
        # Stat after reading: a lock replaced in between (refreshed, or taken over) is dated by the newer file, which
        # errs towards refusing; the other way round, a new holder's record could be dated by the stale file it
        # replaced, and taken over at once.
        fs, path = resolve(self.uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            return None
        try:
            record = json.loads(data.decode("utf-8"))
        except ValueError:  # being written, or foreign
            record = None
        if not isinstance(record, dict):
            record = {}
        if info.mtime is not None:
            written = info.mtime.timestamp()
        else:
            try:
                written = float(record["heartbeat_at"])
            except (KeyError, TypeError, ValueError):
                written = time.time()
        return record, max(0.0, time.time() - written)

    def _refuse(self, record: dict[str, Any], age: float) -> UserError:
        started = record.get("started_at")
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if started else "an unknown time"
        return UserError(
            f"{self.folder} is being written by another run ({record.get('holder', 'unknown')} on "
            f"{record.get('host', 'an unknown host')}, pid {record.get('pid', '?')}, since {since}, last seen "
            f"{age:.0f} s ago); wait for it to finish. If it was killed, its lock ({self.uri}) is taken over "
            f"{self.stale_after_s:.0f} s after it was last seen, or delete that file")

    def acquire(self) -> OutputLock:
        held = self._read()
        if held is not None:
            record, age = held
            if age < self.stale_after_s:
                raise self._refuse(record, age)
            fs, path = resolve(self.uri)
            if isinstance(fs, pafs.LocalFileSystem):
                # Renamed aside, not deleted: of runs taking over together only one rename succeeds, and a later
                # delete cannot remove a lock the winner has just created.
                try:
                    os.rename(path, f"{path}.stale-{self.token}")
                except FileNotFoundError:
                    raise self._refuse({"holder": "another run taking over the same stale lock"}, 0.0) from None
                os.unlink(f"{path}.stale-{self.token}")
            else:
                fs.delete_file(path)
            logger.warning("%s: taking over the lock of a run not seen for %.0f s (%s on %s, pid %s)", self.folder,
                           age, record.get("holder"), record.get("host"), record.get("pid"))
        self._started = time.time()
        self._stop.clear()
        fs, path = resolve(self.uri)
        data = json.dumps(self._record()).encode("utf-8")
        # Held from before the lock is written: a run stopped from here on (SIGTERM during the settle, see
        # runtime.run_main) has release() delete the lock it wrote, which is one with its token.
        self._held = True
        if isinstance(fs, pafs.LocalFileSystem):
            for attempt in range(2):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                    break
                except FileNotFoundError:  # a lock's own subfolder, removed by a holder releasing just now
                    if attempt:
                        self._held = False
                        raise
                except FileExistsError:
                    self._held = False
                    held = self._read()
                    raise self._refuse(*(held or ({}, 0.0))) from None
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        else:
            write_bytes(self.uri, data)
            time.sleep(self.settle_s)
            held = self._read()
            if held is None or held[0].get("token") != self.token:
                self._held = False
                raise self._refuse(*(held or ({}, 0.0)))
        self._thread = threading.Thread(target=self._heartbeat, name="output-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.check()
                write_bytes(self.uri, json.dumps(self._record()).encode("utf-8"))
            except UserError as e:
                logger.warning("%s", e)
                return
            except OSError as e:  # a transient storage error: the next beat tries again
                logger.warning("%s: could not refresh the lock (%s)", self.folder, e)

    def check(self) -> None:
        """Raise UserError when the lock is no longer this run's (taken over after this run was judged dead)."""
        if self.lost is None:
            held = self._read()
            if held is None or held[0].get("token") != self.token:
                self.lost = (f"{self.folder}: this run's lock was taken over by another run"
                             f" ({held[0].get('holder')} on {held[0].get('host')}, pid {held[0].get('pid')})"
                             if held else f"{self.folder}: this run's lock ({self.uri}) was deleted")
        if self.lost is not None:
            raise UserError(f"{self.lost}; stopped before writing again (what is committed is sound)")

    def release(self) -> None:
        """Stop refreshing the lock and delete it, if this run (still) holds it; a no-op when it never did."""
        if not self._held:
            return
        self._held = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            held = self._read()
            if held is not None and held[0].get("token") == self.token:
                fs, path = resolve(self.uri)
                fs.delete_file(path)
                parent = os.path.dirname(path)
                if isinstance(fs, pafs.LocalFileSystem) and parent != resolve(self.folder)[1]:
                    with contextlib.suppress(OSError):  # a lock's own subfolder, when empty
                        os.rmdir(parent)
        except OSError as e:  # the run's own outcome stands; the lock goes stale and is taken over later
            logger.warning("%s: could not remove the lock %s (%s)", self.folder, self.uri, e)
