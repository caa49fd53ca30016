"""Seconds per Ray Data execution of a small latent data set: what a training run pays at start-up.

A DiT run executes its latent data set more than once: the train split at start-up, the validation
split at the first evaluation, and every epoch that streams. On a small data set those executions
are all start-up cost. Two sides, timed in one process on one local Ray cluster:

- the Parquet reader: Ray 2.60's default (DataSourceV2, which starts a pool of FooterReader actors
  for every execution) against the V1 reader that ``pipelines.latents.read_latents`` uses;
- the validation split's UDF: ``pipelines.latents.SplitById`` (a module without torch) against the
  same UDF loaded from a module that imports torch, as it was before (each fresh Ray worker process
  then imports torch first).

    python benchmarks/data_start.py                   # the numbers in RESULTS.md
    python benchmarks/data_start.py --smoke           # fewer repeats

Each side runs ``--repeats`` executions; the first includes worker-process start-up. Prints one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_parts(root: str, rows: int = 1438, parts: int = 2) -> list[str]:
    """Latent-like rows (id, label, 4×8×8 mean and std) in ``parts`` parquet files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    paths = []
    for p, idx in enumerate(np.array_split(np.arange(rows), parts)):
        table = pa.table(
            {
                "id": [f"{i % 10}/{i:04d}.png" for i in idx],
                "label": (idx % 10).astype(np.int32),
                "mean": list(rng.standard_normal((len(idx), 256)).astype(np.float32)),
                "std": list(np.abs(rng.standard_normal((len(idx), 256))).astype(np.float32)),
            }
        )
        path = os.path.join(root, f"part-{p:05d}.parquet")
        pq.write_table(table, path)
        paths.append(path)
    return paths


# The same UDF as pipelines.latents.SplitById, in a module that imports torch (as pipelines.train.dit,
# where it lived, does): written to a file so that Ray's workers import it by name, as they would.
_TORCH_MODULE = """
import hashlib
import numpy as np
import torch  # noqa: F401  (what the old home of the UDF imported)


class SplitByIdInTorchModule:
    def __init__(self, fraction, want_val):
        self.fraction, self.want_val = fraction, want_val

    def __call__(self, batch):
        keep = []
        for i in batch["id"]:
            h = int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "big")
            keep.append((h / 2**64 < self.fraction) == self.want_val)
        mask = np.array(keep, dtype=bool)
        return {k: v[mask] for k, v in batch.items() if k != "id"}
"""


def time_executions(make_ds, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        ds = make_ds()
        t0 = time.perf_counter()
        for _batch in ds.iter_batches(batch_size=32):
            pass
        out.append(round(time.perf_counter() - t0, 3))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--smoke", action="store_true", help="2 repeats")
    parser.add_argument("--json-out", help="also write the JSON line to this file")
    args = parser.parse_args(argv)
    repeats = 2 if args.smoke else args.repeats

    import ray

    from pipelines.latents import SplitById, read_parquet_parts

    tmp = tempfile.mkdtemp(prefix="vitdit-data-start-")
    paths = write_parts(tmp)
    with open(os.path.join(tmp, "torch_udf.py"), "w") as f:
        f.write(_TORCH_MODULE)
    sys.path.insert(0, tmp)
    os.environ["PYTHONPATH"] = os.pathsep.join([tmp, *filter(None, [os.environ.get("PYTHONPATH")])])
    from torch_udf import SplitByIdInTorchModule

    def fresh_cluster(fn):
        """``fn()`` on a new local cluster: each side's first execution starts its own processes."""
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        time.sleep(3)  # let the pre-started worker processes come up before timing anything
        try:
            return fn()
        finally:
            ray.shutdown()

    def v2():
        return ray.data.read_parquet(paths)

    def v1():
        return read_parquet_parts(paths, None)

    cols = ["label", "mean", "std"]
    results = {
        "read_v2_default_s": fresh_cluster(lambda: time_executions(v2, repeats)),
        "read_v1_s": fresh_cluster(lambda: time_executions(v1, repeats)),
        # The validation split as the DiT task builds it (the V1 reader on both sides).
        "val_split_udf_importing_torch_s": fresh_cluster(
            lambda: time_executions(
                lambda: v1().map_batches(SplitByIdInTorchModule(0.1, True)).select_columns(cols), repeats
            )
        ),
        "val_split_udf_torch_free_s": fresh_cluster(
            lambda: time_executions(
                lambda: v1().map_batches(SplitById(0.1, True)).select_columns(cols), repeats
            )
        ),
    }
    record = {
        "benchmark": "data_start",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "ray": ray.__version__,
        "rows": 1438,
        "repeats": repeats,
        **results,
        "note": "seconds per execution; the first of each side includes starting worker processes",
    }
    line = json.dumps(record)
    print(line)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
