"""`vitdit encode` from s3:// to s3://, its driver SIGKILLed mid-run, then re-run: each id exactly once.

The driver joins ``s3_ray_head`` (whose workers have the S3 variables) as a `ray job submit` driver
would; the VAE is read from the bucket too. Budget: ~90 s (a Ray head, two drivers' start-up, 40 images in 10 parts); measured 217 s with 160
images while the machine's load average was 18-21, and 269 s + 192 s of fixtures with 40 images
under the same load: marked slow until measured on a quiet machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from _s3_utils import upload_digits_subset

from pipelines import storage

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _encode(args: list[str], log_path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = open(log_path, "wb")
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.encode_latents", *args],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def _markers(s3) -> list[str]:
    """Finished parts: their progress markers (a ``.json.tmp-*`` is one being written)."""
    return [k for k in s3.keys("resume/latents/_progress/chunk-") if k.endswith(".json")]


@pytest.mark.heavy
@pytest.mark.slow  # over this file's share of the default run's budget on the shared machine (see above)
@pytest.mark.ray
def test_encode_on_s3_survives_a_sigkill_and_writes_each_id_once(
    s3, s3_ray_head, tiny_vae_dir, digits_root, tmp_path
):
    images = f"s3://{s3.bucket}/resume/digits"
    upload_digits_subset(digits_root, images, tmp_path)
    vae = f"s3://{s3.bucket}/resume/vae"
    storage.copy_dir(str(tiny_vae_dir), vae)
    out = f"s3://{s3.bucket}/resume/latents"
    args = ["--input", f"{images}/val", "--output", out, "--vae", vae, "--resolution", "16",
            "--part-size", "4", "--batch-size", "8", "--num-actors", "1", "--num-cpus-per-actor", "1",
            "--address", s3_ray_head.gcs_address]  # fmt: skip

    proc = _encode(args, tmp_path / "first.log")
    try:
        deadline = time.time() + 150
        while time.time() < deadline and proc.poll() is None and not _markers(s3):
            time.sleep(0.2)
        first = (tmp_path / "first.log").read_text()
        assert proc.poll() is None, f"driver ended before the first part: {first[-3000:]}"
        assert _markers(s3), "no finished part within 150 s"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not storage.exists(f"{out}/manifest.json")
    done_before = len(_markers(s3))
    assert 1 <= done_before < 10

    again = _encode(args, tmp_path / "second.log")
    assert again.wait(300) == 0, (tmp_path / "second.log").read_text()[-3000:]
    second = (tmp_path / "second.log").read_text()
    assert f"{done_before} resumed" in second, second[-2000:]
    manifest = storage.read_json(f"{out}/manifest.json")
    assert manifest["vae"]["name_or_path"] == vae
    ids = []
    fs, root = storage.filesystem(out)
    for key in sorted(k for k in s3.keys("resume/latents/") if k.endswith(".parquet")):
        ids += pq.read_table(f"{s3.bucket}/{key}", filesystem=fs, columns=["id"]).column("id").to_pylist()
    expected = sorted(f"{c}/{f}" for c in sorted(os.listdir(os.path.join(digits_root, "val")))
                      for f in sorted(os.listdir(os.path.join(digits_root, "val", c)))[:4])  # fmt: skip
    assert len(ids) == len(set(ids)) == 40 and sorted(ids) == expected
    for log in ("first.log", "second.log"):  # the key never reaches a log line
        assert s3.secret_key not in (tmp_path / log).read_text()
