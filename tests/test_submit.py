"""`vitdit submit` against a real Ray head with its job server on loopback (``ray_head``)."""

from __future__ import annotations

import io
import json
import os
import sys

import pytest

from pipelines.submit import default_python, module_entrypoint, submission_id_for, submit
from vitdit.errors import VitditError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def test_entrypoint_quotes_every_word_and_picks_the_interpreter():
    e = module_entrypoint("train_dit", ["--output", "/tmp/a b", "--model", "DiT-XL/2"], "/opt/py/bin/python")
    assert e == "/opt/py/bin/python -m jobs.train_dit --output '/tmp/a b' --model DiT-XL/2"
    assert default_python("http://127.0.0.1:8265") == sys.executable
    assert default_python("http://10.0.0.5:8265") == "python"
    assert submission_id_for("train_dit", ["--a"]) == submission_id_for("train_dit", ["--a"])
    assert submission_id_for("train_dit", ["--a"]) != submission_id_for("train_dit", ["--b"])


def test_unknown_module_and_unreachable_server_are_clear_errors():
    with pytest.raises(VitditError, match=r"module 'trian_dit': no .*jobs/trian_dit\.py"):
        submit("http://127.0.0.1:1", "trian_dit", [], working_dir=ROOT)
    with pytest.raises(VitditError, match=r"cannot reach the Ray job server.*ray dashboard cluster\.yaml"):
        submit("http://127.0.0.1:1", "data_digits", ["--output", "/tmp/x"], working_dir=ROOT)


@pytest.mark.ray
def test_submit_runs_the_job_streams_logs_and_keeps_secrets_out_of_job_info(ray_head, tmp_path):  # noqa: F811
    from ray.job_submission import JobSubmissionClient

    env = dict(os.environ, AWS_SECRET_ACCESS_KEY=SECRET, MLFLOW_TRACKING_URI="http://127.0.0.1:9")
    out = io.StringIO()
    args = ["--output", str(tmp_path / "digits"), "--resolution", "8"]
    outcome = submit(ray_head.address, "data_digits", args, working_dir=ROOT, out=out, environ=env)
    assert (outcome.status, outcome.exit_code) == ("SUCCEEDED", 0), out.getvalue()
    assert "digits: wrote" in out.getvalue()  # the job's own output, streamed
    assert os.path.isdir(tmp_path / "digits/train/3")

    client = JobSubmissionClient(ray_head.address)
    info = client.get_job_info(outcome.submission_id)
    shown = json.dumps(
        {"entrypoint": info.entrypoint, "metadata": info.metadata, "runtime_env": info.runtime_env}
    )
    assert SECRET not in shown and SECRET not in str(client.list_jobs())
    assert info.runtime_env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    assert info.entrypoint.startswith(sys.executable + " -m jobs.data_digits")

    # The same command again attaches to the finished job instead of submitting a second one.
    n_jobs = len(client.list_jobs())
    again = submit(ray_head.address, "data_digits", args, working_dir=ROOT, out=None, environ=env)
    assert again.submission_id == outcome.submission_id and again.status == "SUCCEEDED"
    assert len(client.list_jobs()) == n_jobs

    # A secret in the arguments never reaches the job server.
    with pytest.raises(VitditError, match="credential"):
        submit(ray_head.address, "data_digits", ["--output", f"/tmp/{SECRET}"], working_dir=ROOT, environ=env)
    assert len(client.list_jobs()) == n_jobs


@pytest.mark.ray
def test_cli_returns_the_jobs_exit_status(ray_head, tmp_path, capsys):  # noqa: F811
    from jobs.submit import main

    # --resolution 4 is bad input for the job: it exits 2, and so does `vitdit submit`.
    code = main(["data_digits", "--address", ray_head.address, "--working-dir", ROOT, "--",
                 "--output", str(tmp_path / "d"), "--resolution", "4"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2, captured
    assert "--resolution 4" in captured.out  # the job's error message, streamed from the cluster
    assert "FAILED" in captured.err
