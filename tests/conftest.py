"""Shared fixtures: one local Ray cluster per test session (127.0.0.1, own temp dir), tiny synthetic data, S3 server."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "jobs"))

# Jobs started by tests must not attach to some other running cluster.
os.environ.pop("RAY_ADDRESS", None)
# Bind every test Ray to 127.0.0.1 (without this, Ray resolves 127.0.0.1 to the machine's address). Read by Ray at
# import time, so it is set before anything imports ray.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# Keep idle workers for a while instead of killing them after 1 s: on 2 cores, restarting a Python worker for
# every Ray Data task costs more than the task.
os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "60000")
# Worker groups can take more than Train's default 60 s to start on a loaded 2-core machine.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("MURA_RAY_CACHE", str(Path(tempfile.gettempdir()) / "mura_ray_test_cache"))


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A local Ray shared by the whole session: more logical CPUs than cores so Train and Data never deadlock.

    It starts after the S3 test server so its workers inherit the AWS test environment.
    """
    import ray

    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    # Name this cluster's API server explicitly: Ray Train's placement-group cleaner and Tune use the State API,
    # which cannot choose between several Ray instances on one machine (e.g. while a test runs its own head).
    dashboard_port = _free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    ray.init(
        address="local", num_cpus=6, include_dashboard=True, dashboard_port=dashboard_port,
        _node_ip_address="127.0.0.1", _temp_dir=temp_dir, log_to_driver=True,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def mura_root(tmp_path_factory) -> Path:
    """A tiny synthetic MURA-v1.1 tree (the folder containing MURA-v1.1)."""
    from mura_ray.data.synthetic import generate_mura

    root = tmp_path_factory.mktemp("mura")
    generate_mura(root, n_images=260, image_size=48, seed=1)
    return root


@pytest.fixture(scope="session")
def mura_dataset(ray_cluster, mura_root, tmp_path_factory) -> str:
    """The tiny synthetic set, ingested to Parquet."""
    from mura_ray.config import IngestConfig
    from mura_ray.data.ingest import ingest

    out = str(tmp_path_factory.mktemp("ingested") / "mura")
    # 64 rows a file: the 170-image train split is 3 files, read and decoded by one fused task each (build_input).
    ingest(IngestConfig(source="mura", root=str(mura_root), out=out, rows_per_file=64))
    return out


@pytest.fixture(scope="session")
def trained_run(ray_cluster, mura_dataset, tmp_path_factory) -> Path:
    """One tiny training run through the real CLI, shared by the scoring and report tests."""
    import train as train_job

    out = tmp_path_factory.mktemp("runs") / "cnn"
    rc = train_job.main([
        "--data", mura_dataset, "--out", str(out), "--backbone", "custom_cnn", "--image-size", "32",
        # 13: epochs cut from one stream end mid-batch (see test_train).
        "--epochs", "3", "--batch-size", "13", "--lr", "3e-3", "--select-metric", "val_auc",
        "--ema", "--ema-decay", "0.9", "--clip-grad", "5",  # validated and exported: the moving average
        "--tta",  # validated over the flips that scoring then averages by default
    ])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def exported_model(tmp_path_factory) -> Path:
    """A randomly initialised custom CNN exported like training exports one (for tests of the plumbing, not of
    what a model learned: they need no training run)."""
    import torch

    from mura_ray.exported import ModelSpec
    from mura_ray.models import build_model, export_model

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("exported") / "model"
    spec = ModelSpec(backbone="custom_cnn", image_size=32, mean=0.5, std=0.25)
    export_model(build_model("custom_cnn").eval(), spec, str(out), {"backbone": "custom_cnn", "note": "random"})
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the moto server on 127.0.0.1:{port} did not start (exit code {proc.poll()})")


@contextlib.contextmanager
def _moto_server():
    """moto's standalone server on 127.0.0.1 in a child process, stopped on exit; yields its endpoint URL."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3 server on 127.0.0.1 (pyarrow's C++ S3 client is not seen by in-process mocks)."""
    with _moto_server() as endpoint:
        env = {
            "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
        }
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield endpoint
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@dataclasses.dataclass(frozen=True)
class AuthS3:
    """An S3 server that checks credentials (see `s3_auth_server`)."""

    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    read_only_key: str
    read_only_secret: str

    def env(self, access_key: str, secret_key: str) -> dict[str, str]:
        """The environment of a job using this server with these credentials (and nothing else of AWS's)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update({"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": access_key,
                    "AWS_SECRET_ACCESS_KEY": secret_key, "AWS_REGION": "us-east-1",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})
        return env

    def use(self, monkeypatch: pytest.MonkeyPatch, access_key: str, secret_key: str) -> None:
        """Point this process's AWS environment at this server, with these credentials, for one test."""
        for name in [k for k in os.environ if k.startswith("AWS_")]:
            monkeypatch.delenv(name)
        for name, value in self.env(access_key, secret_key).items():
            if name.startswith("AWS_"):
                monkeypatch.setenv(name, value)


@pytest.fixture(scope="session")
def s3_auth_server() -> AuthS3:
    """A second moto server, one that authenticates requests, as S3 does: only the access keys created here (a
    user allowed everything on S3, and one allowed to read only) are accepted, with their own secret keys; any
    other key or secret is refused (InvalidAccessKeyId, SignatureDoesNotMatch, AccessDenied).

    moto serves every request unchecked until it is told otherwise (`INITIAL_NO_AUTH_ACTION_COUNT`, infinite by
    default): the users, their keys and a bucket are made first, then checking is switched on
    (`POST /moto-api/reset-auth` with 0: no more unchecked requests).
    """
    import json
    import urllib.request

    import boto3
    from botocore.exceptions import ClientError

    with _moto_server() as endpoint:
        setup = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "setup",
                 "aws_secret_access_key": "setup"}
        iam = boto3.client("iam", **setup)
        keys = {}
        for user, actions in (("writer", ["s3:*"]), ("reader", ["s3:GetObject", "s3:ListBucket"])):
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps({
                "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
            key = iam.create_access_key(UserName=user)["AccessKey"]
            keys[user] = (key["AccessKeyId"], key["SecretAccessKey"])
        bucket = "mura-auth"
        boto3.client("s3", **setup).create_bucket(Bucket=bucket)
        request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                         headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
        server = AuthS3(endpoint, bucket, *keys["writer"], *keys["reader"])
        # Checking is on: the writer's own key works, and nothing else does.
        writer = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=keys["writer"][0],
                              aws_secret_access_key=keys["writer"][1])
        writer.put_object(Bucket=bucket, Key="check", Body=b"ok")
        writer.delete_object(Bucket=bucket, Key="check")
        with pytest.raises(ClientError, match="InvalidAccessKeyId"):
            boto3.client("s3", **setup).list_objects_v2(Bucket=bucket)
        yield server


@pytest.fixture
def s3_bucket(s3_server, ray_cluster):
    """A fresh bucket on the test S3 server."""
    import uuid

    import boto3

    name = f"mura-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture
def spawn():
    """`subprocess.Popen` (text pipes) for a test's child process, killed at the test's end if it still runs."""
    procs: list[subprocess.Popen] = []

    def start(args: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
