"""Results you can trust: a torn JSONL line is repaired, not glued onto; OS errors name the file."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from opdkit.rundir import append_jsonl, atomic_write_text, naming_path, read_jsonl, repair_jsonl_tail


def test_a_torn_last_line_is_cut_before_the_next_append(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"i": 0}\n{"i": 1}\n{"i": 2, "sco')  # killed in the middle of the third append
    assert read_jsonl(path) == [{"i": 0}, {"i": 1}]
    append_jsonl(path, {"i": 2})
    assert path.read_text() == '{"i": 0}\n{"i": 1}\n{"i": 2}\n'
    assert read_jsonl(path) == [{"i": 0}, {"i": 1}, {"i": 2}]


def test_a_last_line_that_lost_only_its_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"i": 0}\n{"i": 1}')
    assert repair_jsonl_tail(path) is True
    assert path.read_text() == '{"i": 0}\n{"i": 1}\n'
    assert repair_jsonl_tail(path) is False  # a whole file is left alone


@pytest.mark.parametrize("text", ['{"i": 0', "\x00\x00", '{"i": 0}\n\xff\xfe{"i"'])
def test_torn_tails_of_any_shape(tmp_path: Path, text: str) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(text.encode("latin-1"))
    complete = text[: text.rfind("\n") + 1]
    append_jsonl(path, {"i": 9})
    assert path.read_bytes() == complete.encode("latin-1") + b'{"i": 9}\n'


def test_a_long_torn_line_is_found_across_read_blocks(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    head = json.dumps({"pad": "x" * 200_000}) + "\n"
    path.write_text(head + '{"pad": "' + "y" * 150_000)
    append_jsonl(path, {"i": 1})
    assert read_jsonl(path) == [{"pad": "x" * 200_000}, {"i": 1}]


def test_os_errors_without_a_file_name_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as info:
        append_jsonl(tmp_path / "rows.jsonl", {"i": 0})
    assert info.value.filename == str(tmp_path / "rows.jsonl") and info.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as info:
        atomic_write_text(tmp_path / "summary.json", "{}")
    assert info.value.filename == str(tmp_path / "summary.json")  # not the .tmp file
    assert not list(tmp_path.glob(".*.tmp"))  # and the temporary file is gone


def test_named_os_errors_keep_their_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info, naming_path(tmp_path / "other"):
        (tmp_path / "missing" / "x").read_text()
    assert info.value.filename == str(tmp_path / "missing" / "x")
