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


def test_a_torn_last_line_is_skipped_on_read_and_cut_off_by_the_next_append(tmp_path):
    path = tmp_path / "a.jsonl"
    append_records(path, [{"a": 1}])
    with path.open("a") as handle:
        handle.write('{"b": 2')
    before = path.read_bytes()
    assert read_records(path) == [(1, {"a": 1})]
    assert path.read_bytes() == before  # reading never changes a file
    append_records(path, [{"c": 3}])
    assert read_records(path) == [(1, {"a": 1}), (2, {"c": 3})]


def test_a_complete_last_record_without_its_newline_is_read_and_kept(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}')
    assert read_records(path) == [(1, {"a": 1}), (2, {"a": 2})]
    assert path.read_text() == '{"a": 1}\n{"a": 2}'
    append_records(path, [{"a": 3}])
    assert read_records(path) == [(1, {"a": 1}), (2, {"a": 2}), (3, {"a": 3})]


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085", "\x0b", "\x0c", "\x1c", "\r"])
def test_text_holding_a_line_separator_round_trips(tmp_path, separator):
    path = tmp_path / "a.jsonl"
    append_records(path, [{"output": f"a{separator}b"}, {"output": "é"}])
    assert read_records(path) == [(1, {"output": f"a{separator}b"}), (2, {"output": "é"})]
    assert len(path.read_text(encoding="utf-8").splitlines()) == 2  # other tools see two lines too


def test_concurrent_writers_never_interleave_lines(tmp_path):
    import multiprocessing

    path = tmp_path / "flags.jsonl"
    context = multiprocessing.get_context("spawn")
    with context.Pool(4) as pool:
        pool.starmap(_append_many, [(path, writer) for writer in range(4)])
    records = [record for _, record in read_records(path)]
    assert sorted((r["writer"], r["n"]) for r in records) == [(w, n) for w in range(4) for n in range(50)]
    assert all(r["text"] == "x" * 5000 for r in records)


def _append_many(path, writer):
    for n in range(50):
        append_records(path, [{"writer": writer, "n": n, "text": "x" * 5000}])


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
