"""The documented cluster path, against a local head: `ray start --head`, then `ray job submit ... jobs/score.py`.

The head runs in its own process group with its own ports and temp dir; the test stops exactly the processes it
started (never `ray stop`, which would take down every Ray on the machine). It runs with token authentication and a
token of its own (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH), as docs/cluster.md tells every cluster to.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _ephemeral_low() -> int:
    """Lowest port the kernel hands out for port 0 (Linux; 32768 elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


@pytest.fixture
def local_head(tmp_path):
    gcs, dash, client, agent_listen, agent_grpc, metrics, runtime_env, node_mgr, obj_mgr = _free_ports(9)
    # Worker ports below the kernel's ephemeral range, where the free ports above come from: the two never collide.
    worker_base = 10000 + (os.getpid() % max(1, (_ephemeral_low() - 10200) // 10)) * 10
    temp_dir = Path(f"/tmp/rj{os.getpid() % 100000}")
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    env.pop("RAY_AUTH_TOKEN", None)  # it would come before the file
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_API_SERVER_ADDRESS", None)  # that names the session's test cluster, not this head
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
        "--dashboard-agent-listen-port", str(agent_listen), "--dashboard-agent-grpc-port", str(agent_grpc),
        "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(runtime_env),
        "--node-manager-port", str(node_mgr), "--object-manager-port", str(obj_mgr),
        "--min-worker-port", str(worker_base), "--max-worker-port", str(worker_base + 200),
        "--num-cpus", "4", "--temp-dir", str(temp_dir), "--disable-usage-stats",
    ]
    log = open(tmp_path / "head.log", "w")  # noqa: SIM115 (closed when the head is stopped)
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                raise AssertionError("the head answered a request without the token")
            except urllib.error.HTTPError as e:
                assert e.code == 401, e  # the dashboard is up and wants the token
                break
            except OSError:
                if time.time() > deadline or head.poll() is not None:
                    tail = (tmp_path / "head.log").read_text()[-3000:]
                    raise RuntimeError(f"the local Ray head did not come up:\n{tail}") from None
                time.sleep(1)
        yield address, env
    finally:
        _stop(head, temp_dir)
        log.close()


def _stop(head: subprocess.Popen, temp_dir: Path) -> None:
    """Stop the head we started: its process group, then any straggler that runs from its temp dir."""
    import psutil

    try:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(str(temp_dir) in part for part in proc.info["cmdline"] or []):
                proc.kill()
        except psutil.Error:
            pass


def _submit(address: str, env: dict[str, str], job: list[str]) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--runtime-env", "cluster/runtime_env.yaml",
           "--working-dir", ".", "--", "python", *job]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_local_head_takes_jobs_only_with_its_token(local_head, tmp_path):
    address, env = local_head
    job = ["-c", "print('job-ran')"]
    wrong = tmp_path / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    for name, client_env in [
        ("no token", {k: v for k, v in env.items() if not k.startswith("RAY_AUTH_")}),
        ("another token", {**env, "RAY_AUTH_TOKEN_PATH": str(wrong)}),
    ]:
        proc = _submit(address, client_env, job)
        assert proc.returncode != 0 and "job-ran" not in proc.stdout, f"{name}: the head took the job"
    proc = _submit(address, env, job)
    assert proc.returncode == 0 and "job-ran" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_job_submit_train_then_score_on_a_local_head(local_head, tmp_path):
    from mura_ray.predictions import read_predictions

    address, env = local_head
    run = tmp_path / "run"
    # The README's main command, `python jobs/train.py` without --data (the synthetic demo), made tiny.
    proc = _submit(address, env, ["jobs/train.py", "--out", str(run), "--demo-images", "120", "--image-size", "32",
                                  "--epochs", "1", "--batch-size", "16"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (run / "model" / "model.safetensors").exists() and (run / "report" / "report.json").exists()
    logs = proc.stdout + proc.stderr
    assert "SYNTHETIC demo radiographs" in logs and "epoch 1/1" in logs  # the per-epoch line reaches the job log
    assert "Reporting training result" not in logs and "execution finished" not in logs  # Ray's chatter does not

    images = tmp_path / "archive" / "XR_WRIST"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(images / f"{i}.png")
    out = tmp_path / "scored"
    proc = _submit(address, env, ["jobs/score.py", "--model", str(run / "model"), "--input",
                                  str(tmp_path / "archive"), "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "scored 6 images" in proc.stdout
    df = read_predictions(str(out))
    assert len(df) == 6 and df["image_id"].is_unique and set(df["body_part"]) == {"WRIST"}
