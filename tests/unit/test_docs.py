"""The user documentation stays true: the generated model table, links, help texts, citations."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re

import pytest

from jobs import cli
from jobs.models import DOCS_PATH, markdown_table, preset_table, with_table

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")
README_MAX_LINES = 150


def _docs_files() -> list[str]:
    return [README] + sorted(os.path.join(DOCS, n) for n in os.listdir(DOCS) if n.endswith(".md"))


def test_models_table_matches_the_registry():
    with open(DOCS_PATH, encoding="utf-8") as f:
        committed = f.read()
    # Built on the meta device: a second or two for every preset, no weights allocated.
    expected = with_table(committed, markdown_table(preset_table()))
    assert committed == expected, (
        "docs/models.md's preset table differs from the registry: regenerate it with "
        "`vitdit models --write-docs` (or `python -m jobs.models --write-docs`) and commit docs/models.md"
    )


def test_with_table_replaces_only_between_the_markers():
    text = "intro\n<!-- models:begin -->\nold\n<!-- models:end -->\noutro\n"
    assert (
        with_table(text, "| new |") == "intro\n<!-- models:begin -->\n| new |\n<!-- models:end -->\noutro\n"
    )


def test_readme_is_short():
    with open(README, encoding="utf-8") as f:
        n = len(f.read().splitlines())
    assert n <= README_MAX_LINES, (
        f"README.md has {n} lines (at most {README_MAX_LINES}): move detail to docs/"
    )


# [text](target) and ![alt](target); a target in angle brackets or with a title is not used here.
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def test_relative_links_point_to_files_that_exist():
    broken = []
    for path in _docs_files():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        # Links inside code blocks are examples, not links.
        text = re.sub(r"```.*?```", "", text, flags=re.S)
        for target in _LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # http(s)://, mailto:, in-page anchors
            file_part = target.split("#", 1)[0]
            if not os.path.exists(os.path.normpath(os.path.join(os.path.dirname(path), file_part))):
                broken.append(f"{os.path.relpath(path, ROOT)}: {target}")
    assert not broken, "links to missing files:\n" + "\n".join(broken)


def test_the_link_checker_sees_links():
    found = _LINK.findall("see [the guide](docs/user-guide.md#mlflow) and ![grid](a/b.png)")
    assert found == ["docs/user-guide.md#mlflow", "a/b.png"]


# --- help texts ---------------------------------------------------------------------------------

# Every command of `vitdit`, and watch mode, whose flags `vitdit evaluate --watch RUN --help` lists.
HELP_ARGVS = [w.split() for w, _, _ in cli.COMMANDS] + [["evaluate", "--watch", "RUN"]]


def _help_of(argv: list[str], monkeypatch) -> tuple[str, list[argparse.ArgumentParser]]:
    """Run ``vitdit <argv> --help`` in this process: its output and the parsers that parsed it."""
    parsers: list[argparse.ArgumentParser] = []
    real_parse = argparse.ArgumentParser.parse_known_args

    def recording_parse(self, *args, **kwargs):
        parsers.append(self)
        return real_parse(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", recording_parse)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--help"])
    assert exit_info.value.code in (0, None), f"vitdit {' '.join(argv)} --help exited {exit_info.value.code}"
    return out.getvalue(), parsers


@pytest.mark.parametrize("argv", HELP_ARGVS, ids=lambda a: "-".join(a))
def test_help_runs_and_every_option_is_explained(argv, monkeypatch):
    text, parsers = _help_of(argv, monkeypatch)
    assert text.startswith("usage: vitdit"), text[:200]
    assert parsers, "the command printed help without an argparse parser"
    parser = parsers[-1]
    formatter = parser._get_formatter()
    problems = []
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings)
        rendered = formatter._expand_help(action) if action.help else ""
        words = re.sub(r"\(default: [^)]*\)", "", rendered).strip()
        if not words:
            problems.append(f"{name}: no help text")
        if rendered.count("(default:") > 1:
            problems.append(f"{name}: the default is printed twice: {rendered!r}")
        if "(default: None)" in rendered or "(default: ())" in rendered:
            problems.append(f"{name}: an empty default printed as a value: {rendered!r}")
        if re.search(r"gflop", rendered, re.I):
            problems.append(f"{name}: GFLOPs named where the number is GMACs")
    # Line continuations lost in a module docstring show as runs of spaces inside a command line.
    for line in text.splitlines():
        if line.lstrip().startswith("vitdit ") and re.search(r"\S {4,}--", line):
            problems.append(f"a broken example line: {line.strip()!r}")
    assert not re.search(r"\(default: [^)]*\)\s*\(default:", text), "a default printed twice"
    assert not problems, f"vitdit {' '.join(argv)} --help:\n" + "\n".join(problems)


def test_readme_lists_every_command():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    missing = [words for words, _, _ in cli.COMMANDS if f"`vitdit {words}`" not in text]
    assert not missing, f"README.md's command table lacks: {missing} (one line each, as in `vitdit --help`)"


def test_top_level_help_lists_every_command():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["--help"]) == 0
    for words, _, text in cli.COMMANDS:
        assert words in out.getvalue()
        assert not re.search(r"gflop", text, re.I), f"{words}: GFLOPs named where the number is GMACs"


# --- citations ------------------------------------------------------------------------------------

# Documents outside this repository (the project's working notes) and issue-tracker numbers: code
# cites docs/ or benchmarks/RESULTS.md instead, which travel with it.
_OUTSIDE = re.compile(
    r"\b(?:FACTS|DESIGN|STYLE)\.md\b|\.\./shared|shared/(?:FACTS|DESIGN|STYLE)|\b[Ii]ssues?[ -]#?\d+|\b[Ii]ssue-\d+"
)


def test_code_cites_no_document_outside_the_repo():
    offenders = []
    for top in ("vitdit", "pipelines", "jobs", "benchmarks", "tests", "configs"):
        for dirpath, _, names in os.walk(os.path.join(ROOT, top)):
            for name in sorted(names):
                if not name.endswith((".py", ".yaml")):
                    continue
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
                if rel == "tests/unit/test_docs.py":  # the pattern itself
                    continue
                with open(path, encoding="utf-8") as f:
                    for i, line in enumerate(f, 1):
                        if _OUTSIDE.search(line):
                            offenders.append(f"{rel}:{i}: {line.strip()}")
    assert not offenders, "cite docs/*.md or benchmarks/RESULTS.md instead:\n" + "\n".join(offenders)
