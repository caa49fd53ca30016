"""Encode throughput and peak memory against data size, and against 1 vs 2 Ray nodes.

For each node count it starts a loopback cluster the way tests/cluster does (tests/_two_nodes.py:
every node a ``ray start --block`` in its own process group, ``--num-cpus 2`` logical each, a small
``--object-store-memory``), and for each size submits ``vitdit encode`` through the job API on a
folder of generated 64 px digit PNGs (the bundled digits, repeated under new names so every image
has its own id; nothing is downloaded), with the tests' tiny VAE, one encoder actor per node.

Memory: a thread samples every 0.25 s the **summed RSS** of every process of the nodes (their
sessions: raylets, GCS, agents, Ray workers and actors, and the job driver; psutil). RSS counts a shared
page once per process that maps it (the object store's shared memory, torch's libraries), so it
overstates the machine's use; it is what grows if a stage holds data it should stream, which is the
point here. Rates are images per second of the whole job (start-up included) and of the stream
(the encode summary's ``seconds``).

    python benchmarks/scale.py                          # sizes 1000 4000, nodes 1 2
    python benchmarks/scale.py --sizes 500 --nodes 1    # a quick check
Writes ``benchmarks/results/cpu_scale_<date>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))


def make_images(root: str, n: int, resolution: int = 64) -> str:
    """``n`` PNGs under ``root/<class>/``: the bundled digits at ``resolution``, repeated under new names."""
    from vitdit.digits import export_digits

    base = os.path.join(root, "_base")
    if not os.path.isdir(base):
        export_digits(base, resolution=resolution, val_fraction=0.2)
    files = sorted(
        os.path.join(dp, f)
        for dp, _, fs in os.walk(os.path.join(base, "train"))
        for f in fs
        if f.endswith(".png")
    )
    out = os.path.join(root, f"n{n}")
    for i in range(n):
        src = files[i % len(files)]
        d = os.path.join(out, os.path.basename(os.path.dirname(src)))
        os.makedirs(d, exist_ok=True)
        shutil.copyfile(src, os.path.join(d, f"{i:07d}.png"))
    return out


class PeakRSS:
    """Summed RSS and PSS of every process of the given nodes (tests/_two_nodes.py: node_processes),
    sampled from a thread.

    RSS counts a shared page once per process that maps it: the object store's shared memory read by
    ten processes counts ten times, so the sum grows with how much of the store each process has
    touched (up to the store's size), not only with what is held. PSS (proportional set size, from
    /proc/PID/smaps_rollup) divides each shared page among the processes that map it: its sum is the
    memory the nodes use.
    """

    def __init__(self, node_pids: list[int], every_s: float = 0.25):
        self.node_pids, self.every_s = list(node_pids), every_s
        self.peak = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> tuple[int, int]:
        import psutil
        from _two_nodes import node_processes

        rss = pss = 0
        for p in node_processes(self.node_pids):
            try:
                full = p.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss, pss = rss + full.rss, pss + getattr(full, "pss", full.rss)
        return rss, pss

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, pss = self._sample()
            self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)
            self._stop.wait(self.every_s)

    def __enter__(self):
        self.baseline, self.baseline_pss = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def submit_measured(cluster, job: str, args: list[str]) -> tuple[str, float, dict]:
    """Submit ``job`` to the cluster and wait: (its log, wall seconds, idle and peak RSS/PSS in MB of
    every process of the nodes while it ran). Raises when the job does not succeed."""
    from pipelines.submit import submit

    log = io.StringIO()
    with PeakRSS([cluster.head.pid, *(w.pid for w in cluster.workers)]) as mem:
        t0 = time.perf_counter()
        outcome = submit(cluster.address, job, args, working_dir=ROOT, out=log, timeout_s=1800)
        wall = time.perf_counter() - t0
    if outcome.status != "SUCCEEDED":
        raise RuntimeError(f"{job} failed: {log.getvalue()[-3000:]}")
    memory = {
        "idle_rss_mb": round(mem.baseline / 2**20),
        "peak_rss_mb": round(mem.peak / 2**20),
        "idle_pss_mb": round(mem.baseline_pss / 2**20),
        "peak_pss_mb": round(mem.peak_pss / 2**20),
    }
    return log.getvalue(), wall, memory


def encode_once(cluster, images: str, vae: str, out: str, num_actors: int) -> dict:
    args = ["--input", images, "--output", out, "--vae", vae, "--resolution", "64", "--part-size", "200",
            "--batch-size", "32", "--num-actors", str(num_actors), "--num-cpus-per-actor", "1"]  # fmt: skip
    log, wall, memory = submit_measured(cluster, "encode_latents", args)
    line = next(x for x in log.splitlines() if x.startswith("encode: read"))
    summary = json.loads(line[line.index("{") :])
    return {
        "images": summary["encoded"],
        "job_s": round(wall, 1),
        "stream_s": summary["seconds"],
        "img_per_s_job": round(summary["encoded"] / wall, 1),
        "img_per_s_stream": round(summary["encoded"] / summary["seconds"], 1),
        **memory,
    }


def train_once(
    cluster, latents: str, out: str, tracking_uri: str, rows: int, global_batch: int = 512
) -> dict:
    """One epoch of ``vitdit train dit`` over ``rows`` latent rows with the in-memory cache off
    (``--cache-rows 0``: every epoch streams from Ray Data), two workers spread over the nodes."""
    steps = rows // global_batch
    args = ["--latents", latents, "--model", "DiT-test/2", "--output", out, "--val-fraction", "0",
            "--steps", str(steps), "--global-batch-size", str(global_batch), "--cache-rows", "0",
            "--num-workers", "2", "--cpus-per-worker", "1", "--placement", "spread", "--precision", "fp32",
            "--checkpoint-every", str(steps), "--eval-every", str(10 * steps), "--log-every", str(steps),
            "--tracking-uri", tracking_uri, "--experiment", "scale-train"]  # fmt: skip
    _, wall, memory = submit_measured(cluster, "train_dit", args)
    return {"rows": rows, "steps": steps, "job_s": round(wall, 1), **memory}


def main(argv: list[str] | None = None) -> int:
    import conftest  # noqa: F401  (sets the Ray env the test clusters use)
    from _two_nodes import start_two_nodes
    from _vae_utils import make_tiny_vae

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000])
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    p.add_argument("--object-store-mb", type=int, default=200)
    p.add_argument("--json-out", default=None)
    a = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="vdscale")
    rows = []
    try:
        vae = make_tiny_vae(os.path.join(work, "vae"))
        sets = {n: make_images(os.path.join(work, "images"), n) for n in a.sizes}
        for nodes in a.nodes:
            cluster = start_two_nodes(object_store_memory=a.object_store_mb * 2**20, workers=nodes - 1)
            try:
                for n in a.sizes:
                    r = encode_once(cluster, sets[n], vae, os.path.join(work, f"out-{nodes}-{n}"), nodes)
                    rows.append({"nodes": nodes, **r})
                    print(json.dumps(rows[-1]), flush=True)
            finally:
                cluster.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("| nodes | images | img/s (job) | img/s (stream) | idle RSS MB | peak RSS MB |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['nodes']} | {r['images']} | {r['img_per_s_job']} | {r['img_per_s_stream']} | "
              f"{r['idle_rss_mb']} | {r['peak_rss_mb']} |")  # fmt: skip
    result = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "object_store_mb_per_node": a.object_store_mb,
        "rows": rows,
    }
    path = a.json_out or os.path.join(ROOT, "benchmarks", "results", f"cpu_scale_{result['date']}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
