"""`vitdit encode` on two Ray nodes through the job API: its actors run on both nodes; a node
SIGKILLed mid-encode loses nothing, and a re-run leaves each image exactly once. One job shows both
(32 px, so the head alone finishes the 1,437 images quickly after the kill).

Budget: ~60 s of the default run (the two-node cluster's start-up, ~20 s, is shared with the other
files of tests/cluster).
"""

from __future__ import annotations

import collections
import glob
import io
import json
import os
import time

import pyarrow.parquet as pq
import pytest

from pipelines.submit import _client, submit, wait_for_job
from vitdit.errors import VitditError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.ray


def encode_args(digits_root: str, vae: str, out: str, part_size: int = 50, resolution: int = 64) -> list[str]:
    return [
        "--input", os.path.join(digits_root, "train"), "--output", out, "--vae", vae,
        "--resolution", str(resolution), "--part-size", str(part_size), "--batch-size", "16",
        "--num-actors", "2", "--num-cpus-per-actor", "1",
    ]  # fmt: skip


def encoder_actor_nodes(address: str, submission_id: str) -> list[str | None]:
    """Node ids of a job's Ray Data encoder actors (state API; None: it never became alive)."""
    from ray.util.state import list_actors

    job_id = _client(address).get_job_info(submission_id).job_id
    actors = list_actors(address=address, filters=[("job_id", "=", job_id)], limit=1000,
                         raise_on_missing_output=False, detail=True)  # fmt: skip
    return [a.node_id for a in actors if "EncodeLatents" in a.class_name]


def marker_nodes(out: str) -> set[str]:
    """The nodes whose actors encoded rows, from every chunk's progress marker."""
    nodes: set[str] = set()
    for m in glob.glob(os.path.join(out, "_progress", "chunk-*.json")):
        nodes.update(json.load(open(m))["nodes"])
    return nodes


def ids_in(out: str) -> collections.Counter:
    ids: collections.Counter = collections.Counter()
    for part in glob.glob(os.path.join(out, "part-*.parquet")):
        ids.update(pq.read_table(part, columns=["id"]).column("id").to_pylist())
    return ids


def expected_ids(digits_root: str) -> set[str]:
    train = os.path.join(digits_root, "train")
    return {os.path.relpath(p, train) for p in glob.glob(os.path.join(train, "*", "*.png"))}


def test_encode_spreads_over_both_nodes_and_a_node_killed_mid_encode_loses_nothing(
    two_nodes, digits_root, tiny_vae_dir, tmp_path
):
    """One encode job with an actor on each node (the state API's node ids); once the first part is
    written, the worker node is SIGKILLed. The job goes on on the head and succeeds; a re-run changes
    nothing; every id is in the output exactly once.

    Killed early on purpose: at 32 px the two actors encode the 1,437 images in ~15 s, and an actor
    with no work left in flight dies unnoticed (a first form, waiting until both nodes had finished a
    part, once killed the worker node too late for the stream to see it)."""
    out = str(tmp_path / "latents")
    args = encode_args(digits_root, tiny_vae_dir, out, part_size=20, resolution=32)
    n_parts = -(-len(expected_ids(digits_root)) // 20)
    # Ray Data starts streaming as soon as one actor is up; the worker node's actor (its first job
    # there: runtime env set-up, torch import) could miss the whole run on a loaded machine. Ray
    # Data's own setting makes the stream wait until the pool is complete.
    wait = "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S"
    first = submit(two_nodes.address, "encode_latents", args, working_dir=ROOT, wait=False, out=None,
                   pass_env=[wait], environ={**os.environ, wait: "240"})  # fmt: skip
    progress = os.path.join(out, "_progress")
    deadline = time.time() + 180
    while not glob.glob(os.path.join(progress, "chunk-*.json")):  # the stream is under way
        assert time.time() < deadline, "encode wrote no part in 180 s"
        time.sleep(0.1)
    actors = encoder_actor_nodes(two_nodes.address, first.submission_id)
    assert len(actors) == 2 and set(actors) == two_nodes.alive_node_ids(), actors  # one per node
    done_at_kill = len(glob.glob(os.path.join(progress, "chunk-*.json")))
    assert done_at_kill < n_parts, "encode finished before the node could be killed"
    dead_after = two_nodes.kill_worker(two_nodes.workers[-1])
    log = io.StringIO()
    try:
        outcome = wait_for_job(_client(two_nodes.address), first.submission_id, out=log, timeout_s=300)
    except VitditError as e:
        raise AssertionError(f"{e}: {log.getvalue()[-4000:]}") from None
    print("\n".join(line for line in log.getvalue().splitlines() if "pipelines.encode" in line))
    print(f"killed the worker node after {done_at_kill}/{n_parts} parts; GCS marked it dead in "
          f"{dead_after:.1f} s; the job {outcome.status}")  # fmt: skip
    # The job goes on, one of two ways, both Ray 2.60's own and both losing nothing:
    # - a task was in flight on the lost actor: the stream fails (max_restarts=0) and the driver
    #   restarts it from the parts without a marker, on the node that is left (pipelines/encode.py:
    #   _encode_chunks);
    # - nothing was in flight on it: Ray Data's actor pool sees the actor dead when it refreshes its
    #   actors' states and stops scheduling on it (ray/data/.../actor_pool_map_operator.py,
    #   _update_running_actor_state), and the head's actor finishes the stream alone. One clean-clone
    #   CI run on 2026-12-05 went this way (killed after 3 of 72 parts, no error in the job's log):
    #   this is the likely reading, not one checked in Ray's logs. Every earlier run restarted.
    assert outcome.status == "SUCCEEDED", log.getvalue()[-3000:]
    restarted = "lost an encoder actor or node" in log.getvalue()
    print("the driver restarted the stream" if restarted else "no error: Ray Data dropped the dead actor")
    if restarted:
        # The error comes before the GCS marks the node dead; the restart waits for that
        # (_actors_that_fit), else it counts the dead node's CPUs and asks the 2-CPU head for 2 actors
        # beside the reads (a hang).
        assert "unfinished parts with 1 actor(s)" in log.getvalue(), log.getvalue()[-3000:]
    # A re-run of the same command finds everything finished and changes nothing.
    rerun_log = io.StringIO()
    again = submit(two_nodes.address, "encode_latents", args, working_dir=ROOT, out=rerun_log, timeout_s=300,
                   submission_id=first.submission_id + "-rerun")  # fmt: skip
    assert again.status == "SUCCEEDED", rerun_log.getvalue()[-3000:]
    rerun = rerun_log.getvalue()
    assert f"({n_parts} parts, {n_parts} resumed" in rerun or "already complete" in rerun, rerun[-2000:]
    ids = ids_in(out)
    assert set(ids) == expected_ids(digits_root), "images lost"
    assert set(ids.values()) == {1}, [i for i, c in ids.items() if c > 1][:5]
    assert json.load(open(os.path.join(out, "manifest.json")))["num_rows"] == len(ids)
    assert not glob.glob(os.path.join(out, "*.tmp-*"))
    assert marker_nodes(out) and marker_nodes(out) <= set(actors)  # each part's marker names its nodes
