"""pipelines/storage.py on local disk: atomic JSON writes, absent vs unreadable files, joins."""

from __future__ import annotations

import json
import os
import threading

import pytest

from pipelines import storage
from vitdit.errors import VitditError


def test_is_uri_and_join():
    assert (
        storage.is_uri("s3://bucket/run") and storage.is_uri("gs://b/x") and storage.is_uri("file:///tmp/x")
    )
    assert not storage.is_uri("/tmp/run") and not storage.is_uri("runs/a://b")  # a scheme starts the string
    assert storage.join("s3://bucket/run/", "checkpoint_00000010", "config.json") == (
        "s3://bucket/run/checkpoint_00000010/config.json"
    )
    assert storage.join("/tmp/run", "summary.json") == os.path.join("/tmp/run", "summary.json")


def test_write_then_read_json_round_trip(tmp_path):
    path = str(tmp_path / "deep" / "dir" / "summary.json")  # parents are created
    storage.write_json(path, {"b": 1, "a": [1.5, None], "t": (1, 2)})
    assert storage.read_json(path) == {"a": [1.5, None], "b": 1, "t": [1, 2]}
    assert storage.read_json("file://" + path) == {"a": [1.5, None], "b": 1, "t": [1, 2]}
    assert os.listdir(tmp_path / "deep" / "dir") == ["summary.json"]  # no temporary file left
    assert storage.exists(path) and not storage.exists(str(tmp_path / "nope.json"))


def test_read_json_absent_is_none_unreadable_is_an_error(tmp_path):
    assert storage.read_json(str(tmp_path / "missing.json")) is None
    (tmp_path / "cut.json").write_text('{"step": 1')  # cut off mid-write by a non-atomic writer
    with pytest.raises(VitditError, match="cut.json: unreadable JSON"):
        storage.read_json(str(tmp_path / "cut.json"))
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(VitditError, match="expected a JSON object"):
        storage.read_json(str(tmp_path / "list.json"))
    (tmp_path / "a_dir.json").mkdir()
    with pytest.raises(VitditError, match="a_dir.json"):
        storage.read_json(str(tmp_path / "a_dir.json"))


def test_write_json_is_atomic_for_concurrent_readers(tmp_path):
    """A reader polling while another thread rewrites the file sees a whole old or new payload,
    never a partial one (a plain open(..., "w") would expose an empty or cut file)."""
    path = str(tmp_path / "state.json")
    big = {f"k{i}": "x" * 200 for i in range(2000)}  # ~430 KB: many write() calls
    storage.write_json(path, {**big, "n": -1})
    stop = threading.Event()

    def writer():
        for n in range(30):
            storage.write_json(path, {**big, "n": n})
        stop.set()

    seen = set()
    t = threading.Thread(target=writer)
    t.start()
    while not stop.is_set():
        with open(path) as f:
            seen.add(json.load(f)["n"])  # raises on a partial file
    t.join()
    assert storage.read_json(path)["n"] == 29 and len(seen) >= 1


def test_failed_write_leaves_the_old_file(tmp_path):
    path = str(tmp_path / "keep.json")
    storage.write_json(path, {"ok": True})

    class Bad:
        def __str__(self):
            raise RuntimeError("not serialisable")

    with pytest.raises(RuntimeError):
        storage.write_json(path, {"bad": Bad()})
    assert storage.read_json(path) == {"ok": True} and os.listdir(tmp_path) == ["keep.json"]


def test_copy_dir_local(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.txt").write_text("hello")
    storage.copy_dir(str(src), str(tmp_path / "dst"))
    assert (tmp_path / "dst" / "sub" / "a.txt").read_text() == "hello"
