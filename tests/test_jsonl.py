"""alpaca_nb.jsonl: kill-safe append-only files."""

from __future__ import annotations

import os
import stat

import pytest

from alpaca_nb.jsonl import append_records, read_records, write_text_atomically


def test_records_round_trip_with_line_numbers(tmp_path):
    path = tmp_path / "sub" / "a.jsonl"
    append_records(path, [{"a": 1}, {"b": "é"}])
    append_records(path, [])
    assert read_records(path) == [(1, {"a": 1}), (2, {"b": "é"})]


def test_a_torn_last_line_is_cut_off_and_appends_continue_cleanly(tmp_path):
    path = tmp_path / "a.jsonl"
    append_records(path, [{"a": 1}])
    with path.open("a") as handle:
        handle.write('{"b": 2')
    assert read_records(path) == [(1, {"a": 1})]
    append_records(path, [{"c": 3}])
    assert read_records(path) == [(1, {"a": 1}), (2, {"c": 3})]


def test_a_corrupt_complete_line_names_file_and_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"a\.jsonl, line 2: invalid JSON"):
        read_records(path)


def test_a_missing_file_has_no_records(tmp_path):
    assert read_records(tmp_path / "none.jsonl") == []


def test_write_text_atomically_creates_folders_replaces_whole_and_leaves_no_staging_file(tmp_path):
    path = tmp_path / "deep" / "curve.json"
    assert write_text_atomically(path, "first\n") == path and path.read_text() == "first\n"
    write_text_atomically(path, "second\n")
    assert path.read_text() == "second\n" and [p.name for p in path.parent.iterdir()] == ["curve.json"]


def test_write_text_atomically_gives_the_file_the_users_usual_permissions(tmp_path):
    previous = os.umask(0o022)  # mkstemp's staging files would leave 0600 whatever the umask
    try:
        path = write_text_atomically(tmp_path / "report.json", "{}\n")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
