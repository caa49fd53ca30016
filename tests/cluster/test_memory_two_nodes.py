"""More data than memory: encoding 4N images on the two-node cluster (200 MB object store per node)
peaks at no more memory than N images (within 1.3×): the stream holds a bounded number of batches
whatever the data size. The same for an epoch of training with the in-memory cache off, on 4N latent
rows (64 px digits: 16 KiB a row, 4N = 384 MiB, about the two object stores together) against N.
Memory is summed over every process of both nodes: RSS for encode, PSS for training (benchmarks/scale.py,
PeakRSS, says what each counts).

Budget: the encode test is in the default run, ~55 s (two encode jobs, 500 and 2,000 images at 64 px);
the training one is ``slow``, ~3.5 minutes (24,576 rows are what reach the stores' size).
"""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
pytestmark = pytest.mark.ray


def test_encode_peak_memory_does_not_grow_with_the_data(two_nodes, tiny_vae_dir, tmp_path):
    from benchmarks.scale import encode_once, make_images

    n = 500
    small = encode_once(
        two_nodes, make_images(str(tmp_path / "img"), n), tiny_vae_dir, str(tmp_path / "a"), 2
    )
    large = encode_once(
        two_nodes, make_images(str(tmp_path / "img"), 4 * n), tiny_vae_dir, str(tmp_path / "b"), 2
    )
    print(f"peak RSS of all Ray processes: {small['peak_rss_mb']} MB for {n} images, "
          f"{large['peak_rss_mb']} MB for {4 * n} (idle {small['idle_rss_mb']} MB)")  # fmt: skip
    assert (small["images"], large["images"]) == (n, 4 * n)
    assert large["peak_rss_mb"] <= 1.3 * small["peak_rss_mb"], (small, large)


@pytest.mark.slow
@pytest.mark.heavy
def test_streaming_training_peak_memory_does_not_grow_with_the_data(
    two_nodes, tiny_vae_dir, mlflow_server, tmp_path
):
    from _train_utils import write_digit_latents

    from benchmarks.scale import train_once

    n = 6_144  # 12 steps of 512; 4N = 48 steps
    runs = []
    for rows in (n, 4 * n):
        latents = write_digit_latents(str(tmp_path / f"latents-{rows}"), tiny_vae_dir, n=rows, resolution=64,
                                      part_rows=1_024)  # fmt: skip
        runs.append(train_once(two_nodes, latents, str(tmp_path / f"dit-{rows}"), mlflow_server, rows))
    small, large = runs
    print(f"training, one streamed epoch: {n} rows peak RSS {small['peak_rss_mb']} MB, PSS {small['peak_pss_mb']} MB; "
          f"{4 * n} rows RSS {large['peak_rss_mb']} MB, PSS {large['peak_pss_mb']} MB "
          f"(idle RSS {small['idle_rss_mb']}, PSS {small['idle_pss_mb']} MB)")  # fmt: skip
    assert (small["steps"], large["steps"]) == (12, 48)
    # PSS, not RSS: the summed RSS grows with how much of the object store each process has touched
    # (benchmarks/scale.py, PeakRSS), which grows with the data up to the store's size.
    assert large["peak_pss_mb"] <= 1.3 * small["peak_pss_mb"], (small, large)
    # Measured 2026-12-04 (idle 2-core EPYC): PSS 5,287 MB for N, 6,098 MB for 4N (1.15x), RSS 1.23x. The
    # +0.8 GB is more than the extra data (288 MB): likely the object stores filling to their 2 x 200 MB and
    # more read-task workers over 24 parts than over 6 (not separated). A cache holding the data would add
    # its 384 MB on top, which this ratio alone would not catch on a data set this small.
