"""Two Ray nodes on loopback: a head (GCS, job server) and worker nodes, every node a
``ray start --block`` in a session of its own, so a test can SIGKILL a whole node (its
raylet, object store, agents and workers) by its session id (``node_processes``).

Built like ``_cluster_utils.start_ray_head`` (own ``--temp-dir``, free ports for every fixed
default, stopped by pid, never ``ray stop``). What is added:

- Fast node-death detection with Ray's own GCS health check (names as in Ray 2.60's
  ``ray_config_def.h``, read from ``RAY_<name>`` variables by the head's GCS):
  ``health_check_period_ms`` 500, ``health_check_timeout_ms`` 1000,
  ``health_check_failure_threshold`` 4, ``health_check_initial_delay_ms`` 1000. A SIGKILLed node is
  marked DEAD ~2-3 s later here (defaults: 3000 ms × 5 ≈ 15-20 s). Tests poll the GCS's node table
  for that state; none sleeps for it.
- Each node declares ``NODE_CPUS`` = 2 logical CPUs (the machine has 2 cores for all of them;
  logical CPUs are scheduling units, not cores). With 1, a node whose one CPU holds an encoder
  actor or a training worker has none left for the Ray Data task that feeds it (a read task asks
  for a whole CPU): the stream never starts (docs/facts.md). The training tests use 1 CPU per
  worker, so ``--placement pack`` fits both workers on one node and ``spread`` must split them.
- A small ``--object-store-memory`` per node (the section-3 tests pass their own).
- ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` short (so a training run that lost a node retries the
  start of its worker group every few seconds instead of every 60 s; see docs/cluster.md).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

from _cluster_utils import HEAD_START_TIMEOUT_S, _ray_cli, free_port, stop_ray_head

HEALTH_CHECK_ENV = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "4",
}
NODE_OBJECT_STORE = 200 * 1024**2
NODE_CPUS = 2


def _node_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_memory_monitor_refresh_ms="0", **HEALTH_CHECK_ENV)
    env.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "5")
    env.pop("RAY_ADDRESS", None)
    env.update(extra or {})
    return env


def _node_ports(head: bool) -> list[str]:
    names = ["node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port"]  # fmt: skip
    if head:
        names += ["port", "dashboard-port"]
    ports = {n: free_port() for n in names}
    return [a for n, p in ports.items() for a in (f"--{n}", str(p))], ports


def node_processes(node_pids: list[int]) -> list:
    """Every process of the nodes started by these ``ray start --block`` pids (psutil.Process).

    A node's raylet, GCS and agents share the ``ray start`` process group, but Ray gives each worker
    process (tasks, actors, ``ray::IDLE``) a process group of its own; all of them stay in the
    node's *session* (``start_new_session``), so the session id is what names a node. Job drivers
    start a session of their own under the node's JobSupervisor: they are found as its children.
    """
    import psutil

    sessions = set(node_pids)
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) in sessions:
                found[p.pid] = p
                for c in p.children(recursive=True):
                    found[c.pid] = c
        except (psutil.NoSuchProcess, ProcessLookupError, PermissionError):
            continue
    return list(found.values())


@dataclass
class TwoNodes:
    """A head and its worker nodes. ``address``: the job server; ``gcs_address``: for ``ray.init``."""

    address: str
    gcs_address: str
    temp_dir: str
    head: subprocess.Popen
    object_store_memory: int
    workers: list[subprocess.Popen] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def start_worker(
        self, num_cpus: int = NODE_CPUS, timeout: float = 2 * HEAD_START_TIMEOUT_S
    ) -> subprocess.Popen:
        """Another node: ``ray start --address <head> --block`` in a session of its own; returns when
        the GCS lists it ALIVE."""
        before = {n["NodeID"] for n in self.nodes()}
        args, _ = _node_ports(head=False)
        log_path = os.path.join(self.temp_dir, f"worker{len(self.workers)}.log")
        cmd = [_ray_cli(), "start", "--address", self.gcs_address, "--block", "--node-ip-address", "127.0.0.1",
               "--num-cpus", str(num_cpus), "--object-store-memory", str(self.object_store_memory),
               "--disable-usage-stats", "--temp-dir", self.temp_dir, *args]  # fmt: skip
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=self.env
            )
        self.workers.append(proc)
        deadline = time.time() + timeout
        while not (self.alive_node_ids() - before):
            if proc.poll() is not None or time.time() > deadline:
                state = (
                    f"exited {proc.returncode}"
                    if proc.poll() is not None
                    else f"not in the GCS after {timeout:.0f} s"
                )
                raise RuntimeError(f"worker node {state}: {open(log_path).read()[-3000:]}")
            time.sleep(0.2)
        return proc

    def kill_worker(self, proc: subprocess.Popen, timeout: float = 60) -> float:
        """SIGKILL every process of a worker node; returns the seconds until the GCS marks it
        DEAD (Ray's health check, see the module docstring)."""
        alive_before = {n["NodeID"] for n in self.nodes() if n["Alive"]}
        doomed = node_processes([proc.pid])
        t0 = time.time()
        for p in doomed:  # all at once, as a machine that goes away
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
        proc.wait(10)
        while len({n["NodeID"] for n in self.nodes() if n["Alive"]} & alive_before) == len(alive_before):
            if time.time() - t0 > timeout:
                raise RuntimeError(f"the GCS still lists the killed node as alive after {timeout} s")
            time.sleep(0.1)
        return time.time() - t0

    def nodes(self) -> list[dict]:
        """The GCS's node table (``ray.nodes()`` shape: NodeID, Alive, Resources, ...)."""
        from ray._raylet import GcsClient

        return [
            {"NodeID": n.node_id.hex(), "Alive": n.state == 0, "Head": n.is_head_node}
            for n in GcsClient(address=self.gcs_address).get_all_node_info(timeout=10).values()
        ]

    def alive_node_ids(self) -> set[str]:
        return {n["NodeID"] for n in self.nodes() if n["Alive"]}

    def stop(self) -> None:
        for proc in self.workers:
            for p in node_processes([proc.pid]):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        stop_ray_head(self.head, self.temp_dir)  # also every process naming the temp dir


def start_two_nodes(object_store_memory: int = NODE_OBJECT_STORE, workers: int = 1) -> TwoNodes:
    """A head plus ``workers`` worker nodes on 127.0.0.1, ``NODE_CPUS`` each."""
    from ray.job_submission import JobSubmissionClient

    from pipelines.submit import enable_token_auth_if_available

    enable_token_auth_if_available()
    temp_dir = tempfile.mkdtemp(prefix="vd2n", dir="/tmp")  # short: unix socket paths
    args, ports = _node_ports(head=True)
    env = _node_env()
    cmd = [_ray_cli(), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--dashboard-host", "127.0.0.1", "--num-cpus", str(NODE_CPUS), "--disable-usage-stats",
           "--temp-dir", temp_dir, "--object-store-memory", str(object_store_memory), *args]  # fmt: skip
    log_path = os.path.join(temp_dir, "head.log")
    with open(log_path, "wb") as log:
        head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    cluster = TwoNodes(
        address=f"http://127.0.0.1:{ports['dashboard-port']}",
        gcs_address=f"127.0.0.1:{ports['port']}",
        temp_dir=temp_dir,
        head=head,
        object_store_memory=object_store_memory,
        env=env,
    )
    try:
        deadline = time.time() + HEAD_START_TIMEOUT_S
        while True:
            if head.poll() is not None:
                raise RuntimeError(f"ray start exited {head.returncode}: {open(log_path).read()[-3000:]}")
            try:
                JobSubmissionClient(cluster.address)
                break
            except Exception:
                if time.time() > deadline:
                    raise RuntimeError(f"job server not up: {open(log_path).read()[-3000:]}") from None
                time.sleep(0.5)
        while not any(n["Head"] and n["Alive"] for n in cluster.nodes()):  # the job server is up first
            if time.time() > deadline:
                raise RuntimeError(f"head raylet not up: {open(log_path).read()[-3000:]}")
            time.sleep(0.2)
        for _ in range(workers):
            cluster.start_worker()
    except BaseException:
        cluster.stop()
        raise
    return cluster
