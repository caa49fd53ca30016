"""A Ray head with a job server on loopback, for tests that submit through the Ray job API.

It is a second cluster beside the suite's in-process ``ray_session``, so it must not be found by
``ray.init()``: it gets its own ``--temp-dir`` (``ray.init()`` with no address reads
``<default temp dir>/ray_current_cluster``, which ``ray start`` writes into its temp dir) and free
ports for everything that has a fixed default (dashboard agent, metrics, runtime env agent).

It is stopped by terminating the processes it started, by id. ``ray stop`` would kill every Ray
process on the machine, including the in-process session and other people's clusters.

Needs ``ray[default]`` (the job server; without it the dashboard starts in minimal mode with no
HTTP server).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import pytest
from _ports import free_port

HEAD_START_TIMEOUT_S = 120


@dataclass
class RayHead:
    address: str  # http://127.0.0.1:<dashboard port>: the job server
    gcs_address: str
    temp_dir: str
    log_path: str


def stop_process_group(proc: subprocess.Popen, graceful: bool = True) -> None:
    """SIGTERM a server started in its own process group (``start_new_session``), SIGKILL it if it
    lingers: `mlflow server` and `moto_server` start children that outlive their parent.

    ``graceful=False`` (the session fixtures' teardown): SIGKILL at once. `mlflow server` took ~3.7 s to
    exit on SIGTERM; nothing is being written when the session ends, and SQLite commits are atomic."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM if graceful else signal.SIGKILL)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def start_mlflow_server(root, artifacts_destination: str) -> tuple[str, subprocess.Popen]:
    """A real `mlflow server` on loopback (SQLite backend under ``root``, its own process group), once
    it answers /health; returns (its http:// URI, the process). Stop it with stop_process_group."""
    import urllib.request

    port = free_port()
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", artifacts_destination,
        "--workers", "1",
    ]  # fmt: skip
    with open(root / "server.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                if r.status == 200:
                    return uri, proc
        except OSError:
            if time.time() > deadline:
                stop_process_group(proc)
                raise RuntimeError("mlflow server did not become healthy in 240 s") from None
            time.sleep(0.5)


def _ray_cli() -> str:
    return os.path.join(os.path.dirname(sys.executable), "ray")


def start_ray_head(num_cpus: int = 4) -> tuple[RayHead, subprocess.Popen]:
    """``ray start --head --block`` in its own session; returns once the job server answers."""
    from ray.job_submission import JobSubmissionClient

    from pipelines.submit import enable_token_auth_if_available

    # `ray start` turns token auth on when ~/.ray/auth_token exists (any earlier ray.init writes
    # one); the client then has to send it.
    enable_token_auth_if_available()
    # Short path: Ray's unix sockets live under the temp dir and paths are limited to ~107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="vdhead", dir="/tmp")
    ports = {
        "port": free_port(),
        "dashboard-port": free_port(),
        "dashboard-agent-listen-port": free_port(),
        "dashboard-agent-grpc-port": free_port(),
        "runtime-env-agent-port": free_port(),
        "metrics-export-port": free_port(),
    }
    cmd = [_ray_cli(), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--dashboard-host", "127.0.0.1", "--num-cpus", str(num_cpus), "--disable-usage-stats",
           "--temp-dir", temp_dir, "--object-store-memory", str(256 * 1024**2)]  # fmt: skip
    for k, v in ports.items():
        cmd += [f"--{k}", str(v)]
    log_path = os.path.join(temp_dir, "head.log")
    # Ray's memory monitor kills workers when the *machine* is nearly full; on a shared test
    # machine that is other people's memory, so this head leaves OOM handling to the kernel.
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_memory_monitor_refresh_ms="0")
    env.pop("RAY_ADDRESS", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    deadline = time.time() + HEAD_START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited {proc.returncode}: {open(log_path).read()[-3000:]}")
        try:
            JobSubmissionClient(address)
            break
        except Exception:
            if time.time() > deadline:
                with open(log_path) as f:
                    tail = f.read()[-3000:]
                stop_ray_head(proc, temp_dir)
                raise RuntimeError(f"Ray job server not up in {HEAD_START_TIMEOUT_S} s: {tail}") from None
            time.sleep(0.5)
    return RayHead(address, f"127.0.0.1:{ports['port']}", temp_dir, log_path), proc


def stop_ray_head(proc: subprocess.Popen, temp_dir: str) -> None:
    """Terminate the head and every process it started (by pid), then remove its temp dir."""
    import psutil

    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    # Job drivers and workers outlive their parent briefly; anything still holding our temp dir
    # on its command line belongs to this head too.
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            mine = p.info["cmdline"] and any(temp_dir in a for a in p.info["cmdline"])
            if mine and p.pid != os.getpid() and p not in procs:
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    # SIGKILL, all at once: `ray start --block` alone took over 20 s to exit on SIGTERM after the
    # quickstart's jobs (the suite's teardown was 34 s), and SIGTERM with a 3 s grace still cost ~5 s
    # a head. A throwaway test cluster needs no orderly shutdown (the node-loss tests kill nodes so).
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(procs, timeout=5)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)  # reap the Popen child
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_head():
    """A Ray head with its job server on 127.0.0.1 (separate from ``ray_session``); yields a RayHead."""
    head, proc = start_ray_head()
    try:
        yield head
    finally:
        stop_ray_head(proc, head.temp_dir)
