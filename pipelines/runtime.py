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
# Whether Ray's own output reaches this terminal (set by `vitdit quickstart/pipeline -v`).
_verbose = True


def set_ray_verbosity(verbose: bool) -> None:
    """``verbose=False``: the next ``init_ray`` keeps Ray's logs off the terminal (see ``_ray_log_options``)."""
    global _verbose
    _verbose = verbose


def _ray_log_options() -> dict:
    """ray.init's logging arguments (Ray 2.60).

    Quiet: ``log_to_driver=False`` stops the relay of every worker's and actor's stdout/stderr (Ray
    Train's controller and PlacementGroupCleaner chatter, core_worker "E" lines of expected actor
    deaths, per-worker step logs), which stay in /tmp/ray/session_latest/logs; ``logging_level``
    ERROR quiets the driver's "ray" logger (start-up INFO, the token-auth WARNING). Errors are not
    lost: a failed task or training run raises in the driver with the remote traceback.
    """
    if _verbose:
        return {"log_to_driver": True}
    return {"log_to_driver": False, "logging_level": logging.ERROR}


def _quiet_ray_data() -> None:
    """Ray Data's progress bars and its "Starting execution" lines off (``DataContext``)."""
    if _verbose:
        return
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # Ray Data's "ray.data" logger does not propagate and has two handlers of its own (Ray 2.60,
    # ray/data/_internal/logging.py): the session's ray-data.log file, kept, and a console handler at
    # INFO ("Starting execution of Dataset ...", "Estimated parquet reader batch size"), raised to ERROR.
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ != "SessionFileHandler":
            handler.setLevel(logging.ERROR)


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
        ray.init(address=address, **_ray_log_options())
        _quiet_ray_data()
        return
    cpus = num_cpus or max(os.cpu_count() or 1, MIN_LOCAL_LOGICAL_CPUS)
    log.info("starting a local Ray cluster with %d logical CPUs", cpus)
    ray.init(num_cpus=cpus, include_dashboard=False, **_ray_log_options())
    _quiet_ray_data()
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
