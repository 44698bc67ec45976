"""Job plumbing: SIGTERM and Ctrl+C unwind a job (its `finally:` blocks run, an output lock is released)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from mura_ray import runtime, storage

REPO = Path(__file__).resolve().parents[1]


def test_sigterm_unwinds_the_job_into_one_line_and_exit_143(capsys):
    before = signal.getsignal(signal.SIGTERM)
    ran = []

    def job(args: argparse.Namespace) -> int:
        # Checked first: without run_main's handler, the signal below would end the test session.
        assert signal.getsignal(signal.SIGTERM) is runtime._on_sigterm
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
            ran.append("not interrupted")
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # a repeat while unwinding is ignored: the clean-up completes
            time.sleep(0.1)
            ran.append("finally")
        return 0

    assert runtime.run_main(job, argparse.ArgumentParser(), [], rerun="run it again") == 143
    assert ran == ["finally"]
    assert capsys.readouterr().err == "interrupted by SIGTERM; run it again\n"
    assert signal.getsignal(signal.SIGTERM) is before  # put back: SIGTERM is run_main's only while it runs


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    def job(args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    assert runtime.run_main(job, argparse.ArgumentParser(), [], rerun="run it again") == 130
    assert capsys.readouterr().err == "interrupted by SIGINT (Ctrl+C); run it again\n"


_PYARROW_S3_ERRORS = {  # pyarrow's messages (26), as S3 (moto's server) answered a wrong key, secret or permission
    "When getting information for key 'ds' in bucket 'b': AWS Error ACCESS_DENIED during HeadObject operation: "
    "No response body.": "s3://b/ds",
    "When listing objects under key 'x/' in bucket 'b': AWS Error INVALID_ACCESS_KEY_ID during ListObjectsV2 "
    "operation: The AWS Access Key Id you provided does not exist in our records.": "s3://b/x",
    "When initiating multiple part upload for key 'y/p' in bucket 'b': AWS Error SIGNATURE_DOES_NOT_MATCH during "
    "CreateMultipartUpload operation: The request signature we calculated does not match": "s3://b/y/p",
    "When testing for existence of bucket 'b': AWS Error UNKNOWN (HTTP status 403) during HeadBucket operation: "
    "Forbidden": "s3://b",
}


@pytest.mark.parametrize("message", list(_PYARROW_S3_ERRORS))
def test_refused_s3_requests_are_recognised(message):
    line = runtime.storage_error_line(OSError(message))
    assert line == (f"{_PYARROW_S3_ERRORS[message]}: access denied (check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                    f"or the bucket policy): {message}")
    assert runtime.first_line(OSError(message)).startswith("access denied (check ")

    class RayTaskErrorLike(OSError):  # Ray re-raises a task's error as a subclass of its class, with `.cause`
        cause = OSError(message)

    assert runtime.storage_error_line(RayTaskErrorLike("ray.exceptions.RayTaskError(OSError): ...\nTraceback")) == line


_UNREACHABLE = ("When getting information for key 'ds' in bucket 'b': AWS Error NETWORK_CONNECTION during HeadObject "
                "operation: curlCode: 7, Couldn't connect to server")


def test_an_unreachable_s3_endpoint_is_recognised(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    assert runtime.storage_error_line(OSError(_UNREACHABLE)) == (
        "s3://b/ds: cannot reach the S3 endpoint http://127.0.0.1:1 (AWS_ENDPOINT_URL); check the address and the "
        f"network: {_UNREACHABLE}")
    assert storage.access_denied(OSError(_UNREACHABLE)) is None
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert runtime.first_line(OSError(_UNREACHABLE)).startswith(
        "cannot reach S3 (no AWS_ENDPOINT_URL set: AWS's); check the address and the network: When getting ")


@pytest.mark.parametrize("error", [
    OSError("When creating bucket 'b': AWS Error UNKNOWN (HTTP status 404) during CreateBucket operation: x"),
    FileNotFoundError("/nowhere: no such file"),
    ValueError("AWS Error ACCESS_DENIED during HeadObject operation"),  # not a storage error
])
def test_other_errors_are_not_called_storage_errors(error):
    assert runtime.storage_error_line(error) is None and storage.s3_problem(error) is None
    assert runtime.first_line(error) == str(error)


def test_a_refused_s3_request_a_job_left_unchecked_is_one_line(s3_auth_server, capsys, monkeypatch):
    """run_main turns S3 refusing the credentials, wherever a job reads or writes, into one line and exit code 2;
    with the right credentials the same job runs."""
    srv = s3_auth_server
    uri = f"s3://{srv.bucket}/datasets/mura"

    def job(args: argparse.Namespace) -> int:
        return 0 if not storage.exists(uri) else 1

    for key, secret in [("AKIAWRONGWRONGWRONG0", srv.secret_key), (srv.access_key, "x" * 40)]:
        srv.use(monkeypatch, key, secret)
        assert runtime.run_main(job, argparse.ArgumentParser(), []) == 2
        assert capsys.readouterr().err == (f"error: {uri}: access denied (check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
                                           " or the bucket policy): When getting information for key "
                                           f"'datasets/mura' in bucket '{srv.bucket}': AWS Error ACCESS_DENIED during "
                                           "HeadObject operation: No response body.\n")
    srv.use(monkeypatch, srv.access_key, srv.secret_key)
    assert runtime.run_main(job, argparse.ArgumentParser(), []) == 0


@pytest.mark.parametrize("job, argv, named", [
    ("ingest", ["--source", "images", "--root", "s3://bkt/archive", "--out", "{tmp}/ds"], "--root s3://bkt/archive"),
    ("train", ["--data", "s3://bkt/mura", "--out", "{tmp}/run", "--backbone", "custom_cnn"], "s3://bkt/mura"),
    ("train", ["--out", "s3://bkt/run"], "--out s3://bkt/run"),  # the demo: --out checked before its set is built
    ("tune", ["--data", "s3://bkt/mura", "--out", "{tmp}/search"], "s3://bkt/mura"),
    ("score", ["--model", "s3://bkt/model", "--input", "s3://bkt/in", "--out", "{tmp}/scores"], "--model s3://bkt/model"),
    ("score", ["--model", "{model}", "--input", "s3://bkt/in", "--out", "{tmp}/scores"], "s3://bkt/in"),
    ("score", ["--model", "{model}", "--input", "{model}", "--out", "s3://bkt/scores"], "--out s3://bkt/scores"),
    ("report", ["--predictions", "s3://bkt/predictions", "--out", "{tmp}/report"], "s3://bkt/predictions"),
])
def test_an_unreachable_s3_endpoint_is_one_line_before_ray_starts(job, argv, named, exported_model, tmp_path, capsys,
                                                                  monkeypatch):
    """Every job given an s3:// location while the endpoint does not answer: one line that names the location and
    the endpoint, exit code 2, no traceback, and Ray not started (train's was pyarrow's traceback; score's said to
    export the model again)."""
    import importlib

    port = _free_port()  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the S3 location was checked")

    monkeypatch.setattr(runtime, "init_ray", no_ray)
    assert importlib.import_module(job).main([a.format(tmp=tmp_path, model=exported_model) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.count("error:") == 1, err
    line = err.splitlines()[-1]
    assert line.startswith(f"error: {named}"), err
    assert (f"cannot reach the S3 endpoint http://127.0.0.1:{port} (AWS_ENDPOINT_URL); check the address and the "
            "network: ") in line, err


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_HOLDER = textwrap.dedent("""
    import argparse, signal, sys, time
    from mura_ray import storage
    # A test session run in the background (`nohup`, `&`) starts its children with SIGINT ignored, as a shell does
    # for background jobs; Ctrl+C reaches a job in a terminal's foreground, where Python's handler is on.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from mura_ray.runtime import run_main

    def job(args):
        lock = storage.OutputLock(sys.argv[1], "a job", settle_s=float(sys.argv[2]))
        try:  # as score._open_output and score.score hold it
            lock.acquire()
            print("holding", flush=True)
            time.sleep(120)
        finally:
            lock.release()

    sys.exit(run_main(job, argparse.ArgumentParser(), [], rerun="run it again"))
""")


@pytest.fixture
def bucket(s3_server) -> str:
    import boto3

    name = f"locks-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.mark.parametrize("case", ["local-SIGTERM", "local-SIGINT", "s3-SIGTERM-while-settling"])
def test_a_stopped_job_releases_its_lock(case, tmp_path, request, spawn):
    """A process holding an OutputLock under run_main, stopped by a signal: it exits 143 or 130 with one line, and
    its lock is gone. On S3 the signal comes during the settle, after the lock was written and before it was read
    back. (Python's default action for SIGTERM ended the process with its lock in place; and a lock was counted as
    held only after the settle, so one stopped during it was not released by Ctrl+C either.)"""
    where, name = case.split("-")[:2]
    sig = getattr(signal, name)
    folder = f"s3://{request.getfixturevalue('bucket')}/scores" if where == "s3" else str(tmp_path / "scores")
    lock_uri = storage.join(folder, storage.OutputLock.NAME)
    settle = "60" if where == "s3" else "0"
    proc = spawn([sys.executable, "-c", _HOLDER, folder, settle], cwd=REPO)
    deadline = time.time() + 60
    while not storage.exists(lock_uri):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    if where == "local":  # holding it: past acquire, the heartbeat thread running
        assert proc.stdout.readline() == "holding\n"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + sig, err
    line = "interrupted by SIGINT (Ctrl+C)" if sig == signal.SIGINT else "interrupted by SIGTERM"
    assert err == f"{line}; run it again\n"
    assert not storage.exists(lock_uri)
