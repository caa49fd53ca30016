"""Starting or joining a Ray cluster the same way from every job and test."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)

# On a 2-core machine, training workers at 1 CPU each leave Ray Data no CPU and the stream hangs
# (docs/facts.md). A local cluster therefore advertises at least this many logical CPUs; each task and
# actor sets torch's thread count to what it was given.
MIN_LOCAL_LOGICAL_CPUS = 4


# Set when this process started the local cluster itself: its resources are then all there will be.
_started_local = False


def check_resources(what: str, need: dict[str, float]) -> None:
    """Fail at once, in one line, when a local cluster cannot ever give ``need`` (e.g. {"CPU": 64}).

    On a cluster joined by address the autoscaler may add nodes, so there it only warns.
    """
    from vitdit.errors import VitditError

    have = ray.cluster_resources()
    short = {k: v for k, v in need.items() if v > have.get(k, 0.0)}
    if not short:
        return
    wants = ", ".join(f"{v:g} {k}" for k, v in need.items())
    has = ", ".join(f"{have.get(k, 0.0):g} {k}" for k in need)
    if _started_local:
        raise VitditError(
            f"{what} needs {wants}; this machine's local Ray cluster has {has}: use fewer workers or "
            "fewer CPUs per worker (--num-workers, --cpus-per-worker), or join a larger cluster (--address)"
        )
    log.warning(
        "%s needs %s; the cluster has %s now: waiting for the autoscaler to add nodes", what, wants, has
    )


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Join ``address`` (or $RAY_ADDRESS), else start a local cluster; no-op if already initialised."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's default of 10 s for the raylet to come up times out on a busy 2-core machine.
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return
    cpus = num_cpus or max(os.cpu_count() or 1, MIN_LOCAL_LOGICAL_CPUS)
    log.info("starting a local Ray cluster with %d logical CPUs", cpus)
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True)
    global _started_local
    _started_local = True


def set_torch_threads(num: float | int | None = None) -> int:
    """Give torch the CPUs this task or actor was assigned (Ray sets OMP_NUM_THREADS=1 otherwise)."""
    import torch

    if num is None and not ray.is_initialized():
        num = os.cpu_count() or 1  # outside Ray: asking the runtime context would start a cluster
    if num is None:
        try:
            num = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        except Exception:  # outside a Ray worker
            num = os.cpu_count() or 1
    threads = max(1, min(int(round(num)), os.cpu_count() or 1))
    torch.set_num_threads(threads)
    return threads
