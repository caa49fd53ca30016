"""More data than memory: encoding 4N images on the two-node cluster (200 MB object store per node)
peaks at no more memory than N images (within 1.3×): the stream holds a bounded number of batches
whatever the data size. Memory is the summed RSS of every process of both nodes (benchmarks/scale.py
says what that counts).

Budget: ``slow``, ~2-3 minutes (two encode jobs, 500 and 2,000 images at 64 px).
"""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.heavy]


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
