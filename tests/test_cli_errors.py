"""Bad paths exit 2 with a line naming them; Ctrl-C says how to resume (jobs._common.run_main)."""

from __future__ import annotations

import sys

import pytest

from jobs._common import resume_command, run_main


def test_a_file_where_a_directory_belongs_is_exit_2_naming_it(tmp_path, capsys):
    afile = tmp_path / "not-a-dir"
    afile.write_text("x")

    def body():
        (afile / "sub").mkdir()  # NotADirectoryError, as a job writing under --output would get

    assert run_main(body) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(afile) in err and "Traceback" not in err


def test_quickstart_workdir_that_is_a_file(tmp_path, capsys):
    from jobs import quickstart

    afile = tmp_path / "qs"
    afile.write_text("x")
    assert quickstart.main(["--workdir", str(afile)]) == 2
    err = capsys.readouterr().err
    assert str(afile) in err and "Traceback" not in err
    assert afile.read_text() == "x"  # nothing overwritten


def test_interrupt_prints_the_command_that_resumes(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/vitdit", "train", "dit", "--output", "runs/my run"])
    assert resume_command() == "vitdit train dit --output 'runs/my run'"

    def body():
        raise KeyboardInterrupt

    assert run_main(body) == 130
    assert "vitdit train dit --output 'runs/my run'" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["/repo/jobs/train_dit.py", "--steps", "5"])
    assert resume_command() == "python -m jobs.train_dit --steps 5"


@pytest.mark.parametrize("argv", [[], ["x"]])
def test_resume_command_never_fails(monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", argv)
    assert isinstance(resume_command(), str)


@pytest.mark.parametrize("dry_run", [True, False])
def test_redo_of_a_stage_the_recipe_lacks_is_refused_before_anything_runs(tmp_path, capsys, dry_run):
    from jobs.pipeline import main as pipeline
    from jobs.quickstart import main as quickstart

    flags = ["--dry-run"] if dry_run else []
    assert quickstart(["--workdir", str(tmp_path / "qs"), "--redo", "bogus", *flags]) == 2
    assert "--redo bogus: not a stage" in capsys.readouterr().err
    assert not (tmp_path / "qs" / "data").exists()  # nothing ran
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nworkdir: {tmp_path / 'w'}\nresolution: 16\nstages: {{data: {{}}}}\n")
    assert pipeline([str(recipe), "--redo", "dit", *flags]) == 2
    assert "--redo dit: not a stage" in capsys.readouterr().err
