"""Security: no pickled code runs when loading checkpoints or VAEs; credentials stay out of jobs and recipes.

A crafted pickle whose unpickling would create a marker file stands in for an attacker's payload:
every loader must refuse it with a clear error, and the marker must not appear.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from vitdit.errors import VitditError

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


class _Payload:
    """Unpickling this calls open(marker, "w"): harmless, but proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _write_evil_pickle(path: str, marker: str) -> None:
    # torch.save's zip format with a pickled object inside, as a poisoned checkpoint would be.
    torch.save({"step": 1, "optimizer": _Payload(marker)}, path)


def test_crafted_train_state_is_refused_and_runs_no_code(tmp_path):
    from vitdit.checkpoint import load_checkpoint
    from vitdit.errors import UnsafeCheckpointError

    ckpt = tmp_path / "checkpoint_00000001"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"kind": "dit", "step": 1}))
    save_file({"w": torch.zeros(2)}, str(ckpt / "model.safetensors"))
    marker = tmp_path / "pwned"
    _write_evil_pickle(str(ckpt / "train_state.pt"), str(marker))
    # The payload is real: an unsafe load of a copy runs it (and creates its own marker).
    proof = tmp_path / "proof"
    _write_evil_pickle(str(tmp_path / "copy.pt"), str(proof))
    torch.load(str(tmp_path / "copy.pt"), weights_only=False)
    assert proof.exists()
    with pytest.raises(UnsafeCheckpointError, match=r"train_state\.pt.*refusing"):
        load_checkpoint(ckpt)
    assert not marker.exists()


def test_release_style_pt_with_pickled_code_is_refused(tmp_path):
    pytest.importorskip("pipelines.sample")
    from pipelines.sample import checkpoint_info

    marker = tmp_path / "pwned"
    pt = tmp_path / "DiT-XL-2-256x256.pt"
    _write_evil_pickle(str(pt), str(marker))
    with pytest.raises(VitditError, match=r"DiT-XL-2-256x256\.pt.*weights_only"):
        checkpoint_info(str(pt))
    assert not marker.exists()
    if importlib.util.find_spec("jobs.sample") is not None:  # the CLI path: a clear error, exit 2
        from jobs.sample import main

        out = tmp_path / "samples"
        assert main(["--checkpoint", str(pt), "--num-samples", "2", "--output", str(out)]) == 2
        assert not marker.exists()


def test_vae_with_pickled_weights_is_refused(tmp_path):
    from _vae_utils import make_tiny_vae

    from vitdit.vae import load_vae

    vae_dir = make_tiny_vae(tmp_path / "vae")
    # Replace the safetensors weights with a pickle-format .bin carrying code.
    os.remove(os.path.join(vae_dir, "diffusion_pytorch_model.safetensors"))
    marker = tmp_path / "pwned"
    with open(os.path.join(vae_dir, "diffusion_pytorch_model.bin"), "wb") as f:
        pickle.dump({"encoder.conv_in.weight": _Payload(str(marker))}, f)
    with pytest.raises(VitditError, match="vae"):
        load_vae(vae_dir)
    assert not marker.exists()


def test_submit_refuses_credentials_in_job_arguments():
    from pipelines.submit import check_no_secrets

    env = {"AWS_SECRET_ACCESS_KEY": SECRET, "HOME": "/home/x"}
    with pytest.raises(VitditError, match="credential"):
        check_no_secrets(["--output", f"s3://bucket/x?key={SECRET}"], env)
    with pytest.raises(VitditError, match="--aws-secret-access-key"):
        check_no_secrets(["--aws-secret-access-key=abc"], env)
    with pytest.raises(VitditError, match="credential"):
        check_no_secrets(["--tracking-uri", "https://alice:hunter22@mlflow.example.com"], env)
    check_no_secrets(["--output", "s3://bucket/runs", "--steps", "10"], env)  # ordinary args pass


def test_runtime_env_carries_no_secret_unless_asked(tmp_path):
    from pipelines.submit import build_runtime_env, module_entrypoint

    env = {"AWS_SECRET_ACCESS_KEY": SECRET, "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "HOME": "/h"}
    rt = build_runtime_env(str(tmp_path), environ=env)
    assert rt["env_vars"] == {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}
    assert ".venv" in rt["excludes"] and ".git" in rt["excludes"]
    assert SECRET not in json.dumps(rt)
    assert SECRET not in module_entrypoint("train_dit", ["--steps", "10"])
    # Asked for explicitly: it travels (and the user was warned that the dashboard shows it).
    assert (
        build_runtime_env(str(tmp_path), ["AWS_SECRET_ACCESS_KEY"], environ=env)["env_vars"][
            "AWS_SECRET_ACCESS_KEY"
        ]
        == SECRET
    )
    # A tracking URI with a password would be printed with the runtime env: refused.
    with pytest.raises(VitditError, match="MLFLOW_TRACKING_PASSWORD"):
        build_runtime_env(
            str(tmp_path), environ={"MLFLOW_TRACKING_URI": "https://u:p4ssw0rd@mlflow.example.com"}
        )


def test_redact_hides_secret_values_and_uri_passwords():
    from pipelines.submit import redact, secret_values

    env = {"HF_TOKEN": "hf_abcdefghijklmnop", "AWS_SECRET_ACCESS_KEY": SECRET, "PATH": "/usr/bin"}
    text = f"token=hf_abcdefghijklmnop key {SECRET} uri https://bob:s3cr3tpw@host/x path /usr/bin"
    out = redact(text, secret_values(env))
    assert "hf_abcdefghijklmnop" not in out and SECRET not in out and "s3cr3tpw" not in out
    assert "https://bob:***@host/x" in out and "/usr/bin" in out


@pytest.mark.parametrize(
    "stages, match",
    [
        (
            {"data": {}, "vae": {"steps": 1, "aws_secret_access_key": "x"}},
            r"stages\.vae\.aws_secret_access_key",
        ),
        (
            {"data": {}, "vae": {"steps": 1, "images_url": "https://u:pw12345@host/imgs"}},
            r"stages\.vae\.images_url",
        ),
        ({"data": {"api_key": "abc"}}, r"stages\.data\.api_key"),
    ],
)
def test_recipe_loader_rejects_credentials(stages, match):
    from pipelines.recipe import parse_recipe

    raw = {"name": "t", "workdir": "/tmp/x", "resolution": 16, "stages": stages}
    with pytest.raises(VitditError, match=match):
        parse_recipe(raw, source="r.yaml")
    with pytest.raises(VitditError, match=r"r\.yaml\.inputs\.vae"):
        parse_recipe(
            {**raw, "stages": {"data": {}}, "inputs": {"vae": "AKIAIOSFODNN7EXAMPLE"}}, source="r.yaml"
        )
