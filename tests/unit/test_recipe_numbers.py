"""The numbers recipe (configs/numbers.yaml, the packaged vitdit/recipes/numbers.yaml that
`vitdit quickstart --task numbers` runs): how its stages are wired, without running them."""

from __future__ import annotations

import os
import shlex

import pytest

from pipelines.recipe import load_recipe, parse_recipe, plan, stage_command
from vitdit.errors import VitditError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _flags(argv: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for i, a in enumerate(argv):
        if a.startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
            out[a] = nxt
    return out


def test_numbers_recipe_wires_the_numbers_set_the_digits_reader_and_the_prompts():
    recipe = load_recipe(os.path.join(ROOT, "configs", "numbers.yaml"))
    steps = {stage.name: (stage, argv) for stage, argv, _ in plan(recipe, strict=False)}
    assert list(steps) == ["data", "numbers", "vae", "encode", "vit", "mmdit", "sample", "evaluate"]
    w = recipe.workdir
    f = {name: _flags(argv) for name, (_, argv) in steps.items()}
    assert f["vae"]["--images"] == f"{w}/numbers" and f["encode"]["--input"] == f"{w}/numbers/train"
    assert f["vit"]["--images"] == f"{w}/data"  # the classifier reads digits, glyph by glyph
    assert f["mmdit"]["--latents"] == f"{w}/latents"
    steps_ = int(recipe.stages["mmdit"]["steps"])
    assert f["sample"]["--checkpoint"] == f"{w}/mmdit/checkpoint_{steps_:08d}"
    assert f["sample"]["--prompts-file"] == f"{w}/numbers/prompts.txt"
    assert f["evaluate"]["--reference"] == f"{w}/numbers/val" and "--numbers" in f["evaluate"]
    stage, argv = steps["mmdit"]
    assert shlex.split(stage_command(stage, argv))[:3] == ["vitdit", "train", "mmdit"]


def test_the_digits_recipe_is_wired_as_before():
    recipe = load_recipe(os.path.join(ROOT, "configs", "digits.yaml"))
    f = {stage.name: _flags(argv) for stage, argv, _ in plan(recipe, strict=False)}
    assert f["vit"]["--images"] == f["vae"]["--images"] == f"{recipe.workdir}/data"
    assert "--prompts-file" not in f["sample"] and "--numbers" not in f["evaluate"]


def test_an_mmdit_stage_needs_latents(tmp_path):
    raw = {"name": "x", "workdir": str(tmp_path), "resolution": 16, "stages": {"mmdit": {"steps": 1}}}
    with pytest.raises(VitditError, match="needs 'latents'"):
        parse_recipe(raw)


def test_configs_numbers_is_the_packaged_quickstart_recipe():
    """configs/numbers.yaml is the editable copy of what `vitdit quickstart --task numbers` runs."""
    import yaml

    from pipelines import quickstart

    with open(os.path.join(ROOT, "configs", "numbers.yaml")) as f:
        editable = yaml.safe_load(f)
    packaged, smoke = quickstart.recipe_documents("numbers")
    assert editable == packaged
    assert set(smoke["stages"]) <= set(packaged["stages"])  # smoke overrides only existing stages
    # The quickstart's MM-DiT samples the checkpoint it trains; its captions fit the text length.
    assert packaged["stages"]["mmdit"]["text_max_length"] >= 8


def test_quickstart_task_numbers_prints_and_plans_the_numbers_recipe(tmp_path, capsys):
    from jobs.quickstart import main

    assert main(["--task", "numbers", "--print-recipe"]) == 0
    assert "name: numbers" in capsys.readouterr().out
    assert main(["--task", "numbers", "--dry-run", "--smoke-test", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "vitdit train mmdit" in out and "--model MMDiT-tiny" in out and "--numbers" in out
    with pytest.raises(SystemExit) as e:  # argparse's choices: one line naming the flag, exit 2
        main(["--task", "letters", "--dry-run"])
    assert e.value.code == 2
    assert "--task" in capsys.readouterr().err


def test_unknown_task_names_the_known_ones():
    from pipelines.quickstart import get_task

    with pytest.raises(VitditError, match="unknown.*digits, numbers"):
        get_task("letters")
