"""alpaca_nb.data: the real upstream files, and every kind of bad input named by file, line and field."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from alpaca_nb.data import (
    ASSETS,
    AlpacaRecord,
    DataError,
    SeedTask,
    describe_assets,
    git_blob_id,
    load_alpaca_data,
    load_eval_instructions,
    load_prompt_template,
    load_seed_tasks,
    resolve,
)

GOOD_SEED = {"id": "seed_task_0", "name": "hello", "instruction": "Say hello.", "is_classification": False,
             "instances": [{"input": "", "output": "Hello."}]}


def write_jsonl(path: Path, records: list, newline: str = "\n") -> Path:
    path.write_text(newline.join(json.dumps(r) if not isinstance(r, str) else r for r in records) + newline,
                    encoding="utf-8", newline="")
    return path


# ----------------------------------------------------------------------------- the real files


def test_seed_tasks_real_file_has_175_tasks_26_classification():
    tasks = load_seed_tasks()
    assert len(tasks) == 175
    assert all(isinstance(task, SeedTask) for task in tasks)
    assert sum(task.is_classification for task in tasks) == 26
    assert tasks[0].id == "seed_task_0" and tasks[0].name == "breakfast_suggestion"
    assert len({task.id for task in tasks}) == 175


def test_eval_instructions_real_file_has_252_with_208_inputs():
    items = load_eval_instructions()
    assert len(items) == 252
    assert items[0].id == "user_oriented_task_0" and items[0].motivation_app == "Grammarly"
    assert sum(1 for item in items if item.input.strip()) == 208
    assert len({item.motivation_app for item in items}) == 71


def test_alpaca_sample_is_the_first_100_records():
    records = load_alpaca_data(asset="alpaca_sample")
    assert len(records) == 100
    assert isinstance(records[0], AlpacaRecord)
    assert records[0].instruction == "Give three tips for staying healthy."
    assert records[1].instruction == "What are the three primary colors?"
    assert sum(1 for record in records if record.input) == 46


def test_alpaca_default_asset_follows_the_profile(monkeypatch):
    monkeypatch.setenv("ALPACA_NB_PROFILE", "laptop")
    assert len(load_alpaca_data()) == 100


def test_gpt4_demo_subset_loads_999_records():
    assert len(load_alpaca_data(asset="alpaca_gpt4_demo")) == 999


def test_prompt_template_is_upstream_prompt_txt():
    text = load_prompt_template()
    assert text.startswith("You are asked to come up with a set of 20 diverse task instructions.")
    assert text.endswith("List of 20 tasks:")


def test_every_file_in_the_data_dir_matches_its_pinned_hash():
    for name, asset in ASSETS.items():
        if name == "alpaca_data":
            continue  # the 52K file is not available offline
        data = resolve(name, allow_download=False).read_bytes()
        assert asset.sha256 or asset.git_blob, name
        assert asset.sha256 is None or hashlib.sha256(data).hexdigest() == asset.sha256, name
        assert asset.git_blob is None or git_blob_id(data) == asset.git_blob, name


def test_git_blob_id_matches_git_hash_object():
    assert git_blob_id(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_describe_assets_lists_every_asset_with_url_and_licence():
    table = describe_assets()
    assert set(table["asset"]) == set(ASSETS)
    upstream = table["pinned source"].str.startswith("https://raw.githubusercontent.com/")
    assert set(table.loc[~upstream, "asset"]) == {"instruction_difficulty"}  # derived here, SOURCES.md says how
    assert ASSETS["alpaca_data"].records == 52002


# ----------------------------------------------------------------------------- resolution


def test_a_substituted_file_in_the_data_dir_is_refused(tmp_path, monkeypatch):
    (tmp_path / "seed_tasks.jsonl").write_text(json.dumps(GOOD_SEED) + "\n")
    monkeypatch.setenv("ALPACA_NB_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match=r"seed_tasks\.jsonl: sha256 does not match the pinned seed_tasks"):
        load_seed_tasks()


def test_offline_with_nothing_found_says_which_file_where_and_how(isolated_cache, monkeypatch):
    monkeypatch.setenv("ALPACA_NB_OFFLINE", "1")
    with pytest.raises(DataError) as caught:
        load_seed_tasks()
    message = str(caught.value)
    assert "seed_tasks.jsonl" in message
    assert str(isolated_cache) in message
    assert "ALPACA_NB_DATA_DIR" in message and ASSETS["seed_tasks"].url in message


def test_cache_is_used_when_the_data_dir_is_unset(upstream_dir, isolated_cache):
    isolated_cache.mkdir()
    (isolated_cache / "prompt.txt").write_bytes((upstream_dir / "prompt.txt").read_bytes())
    assert resolve("prompt", allow_download=False) == isolated_cache / "prompt.txt"


def test_unknown_asset_lists_the_known_ones():
    with pytest.raises(DataError, match="unknown asset 'nope'; known assets: alpaca_data"):
        resolve("nope")


def test_missing_explicit_path_is_named(tmp_path):
    with pytest.raises(DataError, match=r"nothing\.jsonl: no such file"):
        load_seed_tasks(tmp_path / "nothing.jsonl")


# ----------------------------------------------------------------------------- bad input


def test_bom_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "seeds.jsonl"
    body = "\r\n".join([json.dumps(GOOD_SEED), json.dumps({**GOOD_SEED, "id": "seed_task_1"})]) + "\r\n"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert [task.id for task in load_seed_tasks(path)] == ["seed_task_0", "seed_task_1"]


@pytest.mark.parametrize(
    ("line2", "expected"),
    [
        ("{not json", r"line 2: invalid JSON"),
        ("[1, 2]", r"line 2: expected a JSON object, got list"),
        (json.dumps({k: v for k, v in GOOD_SEED.items() if k != "instruction"} | {"id": "s1"}),
         r"line 2, field 'instruction': missing"),
        (json.dumps(GOOD_SEED | {"id": "s1", "instruction": "  "}), r"line 2, field 'instruction': empty"),
        (json.dumps(GOOD_SEED | {"id": "s1", "is_classification": "no"}),
         r"line 2, field 'is_classification': expected bool, got str"),
        (json.dumps(GOOD_SEED | {"id": 7}), r"line 2, field 'id': expected str, got int"),
        (json.dumps(GOOD_SEED | {"id": "s1", "instances": []}), r"line 2, field 'instances': empty"),
        (json.dumps(GOOD_SEED | {"id": "s1", "instances": [{"input": ""}]}),
         r"line 2, instances\[0\], field 'output': missing"),
        (json.dumps(GOOD_SEED | {"id": "s1", "instances": ["x"]}), r"line 2, field 'instances\[0\]': expected object"),
        (json.dumps(GOOD_SEED), r"line 2, field 'id': duplicate id 'seed_task_0' \(first seen at line 1\)"),
    ],
    ids=["invalid_json", "not_an_object", "missing_field", "empty_field", "mistyped_bool", "mistyped_id",
         "no_instances", "instance_missing_output", "instance_not_object", "duplicate_id"],
)
def test_bad_seed_line_names_file_line_and_field(tmp_path, line2, expected):
    path = write_jsonl(tmp_path / "seeds.jsonl", [GOOD_SEED, line2])
    with pytest.raises(DataError, match=expected) as caught:
        load_seed_tasks(path)
    assert str(caught.value).startswith(str(path))


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n \n")
    with pytest.raises(DataError, match=r"empty\.jsonl: file is empty"):
        load_seed_tasks(path)


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD_SEED).encode() + b"\n" + json.dumps(GOOD_SEED | {"id": "s1"}).encode().replace(b"hello", b"h\xe9llo") + b"\n")
    with pytest.raises(DataError, match=r"latin1\.jsonl, line 2: not valid UTF-8 \(byte 0xe9"):
        load_seed_tasks(path)


def test_eval_loader_checks_its_own_fields(tmp_path):
    good = {"id": "t0", "motivation_app": "Grammarly", "instruction": "Fix it.", "instances": [{"input": "a", "output": "b"}]}
    path = write_jsonl(tmp_path / "eval.jsonl", [good, {**good, "id": "t1", "motivation_app": None}])
    with pytest.raises(DataError, match=r"line 2, field 'motivation_app': expected str, got NoneType"):
        load_eval_instructions(path)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('[{"instruction": "a", "input": "", "output": "b"},\n {"instruction": "c", "input": ""', r"line 2: invalid JSON"),
        ('{"instruction": "a"}', r"expected a JSON array of records, got dict"),
        ("[]", r"the array holds no records"),
        ('[{"instruction": "a", "input": "", "output": "b"}, 3]', r"record 1: expected a JSON object, got int"),
        ('[{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "output": "d"}]',
         r"record 1, field 'input': missing"),
        ('[{"instruction": "a", "input": "", "output": ""}]', r"record 0, field 'output': empty"),
        ('[{"instruction": "a", "input": 5, "output": "b"}]', r"record 0, field 'input': expected str, got int"),
    ],
    ids=["invalid_json", "not_an_array", "empty_array", "record_not_object", "missing_input", "empty_output", "mistyped_input"],
)
def test_bad_alpaca_file_names_file_record_and_field(tmp_path, content, expected):
    path = tmp_path / "alpaca.json"
    path.write_text(content)
    with pytest.raises(DataError, match=expected) as caught:
        load_alpaca_data(path)
    assert str(caught.value).startswith(str(path))


def test_empty_outputs_can_be_kept_on_request_and_are_counted(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text('[{"instruction": "a", "input": "", "output": ""}, {"instruction": "b", "input": "", "output": "c"}]')
    with pytest.warns(UserWarning, match="1 records have an empty output"):
        records = load_alpaca_data(path, allow_empty_output=True)
    assert len(records) == 2


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


# ----------------------------------------------------------------------------- evaluation files (chapter 5)


def test_davinci_answers_follow_the_252_instructions_in_order():
    from alpaca_nb.data import load_davinci_eval_answers, load_eval_instructions

    answers, instructions = load_davinci_eval_answers(), load_eval_instructions()
    assert len(answers) == 252 and answers[0].generator == "text-davinci-003"
    assert [a.instruction for a in answers] == [i.instruction for i in instructions]
    assert sum(not a.output.strip() for a in answers) == 0


def _lines(upstream_dir, name):
    return (upstream_dir / name).read_text().splitlines()


def test_davinci_answers_of_the_wrong_length_or_order_are_refused(upstream_dir, tmp_path):
    from alpaca_nb.data import load_davinci_eval_answers

    lines = _lines(upstream_dir, "self_instruct_text-davinci-003_predictions.jsonl")
    short = tmp_path / "short.jsonl"
    short.write_text("\n".join(lines[:251]) + "\n")
    with pytest.raises(DataError, match=r"short\.jsonl: 251 answers for 252 evaluation instructions"):
        load_davinci_eval_answers(short)
    swapped = tmp_path / "swapped.jsonl"
    swapped.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")
    with pytest.raises(DataError, match=r"swapped\.jsonl, line 1, field 'instruction': does not match instruction 0"):
        load_davinci_eval_answers(swapped)
    missing = tmp_path / "missing.jsonl"
    record = json.loads(lines[0])
    del record["response"]
    missing.write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    with pytest.raises(DataError, match=r"missing\.jsonl, line 1, field 'response': missing"):
        load_davinci_eval_answers(missing)


def test_alpaca_eval_files_load_as_typed_records():
    from alpaca_nb.data import load_alpaca_eval_annotations, load_alpaca_eval_outputs, load_leaderboard

    alpaca, davinci = load_alpaca_eval_outputs(), load_alpaca_eval_outputs("alpaca_eval_davinci_003")
    assert len(alpaca) == len(davinci) == 805 and alpaca[0].generator == "alpaca-7b"
    assert [a.instruction for a in alpaca] == [d.instruction for d in davinci]
    judgements = load_alpaca_eval_annotations()
    assert {j.preference for j in judgements} == {0.0, 1.0, 2.0}
    board = load_leaderboard()
    assert board["alpaca-7b"].n_total == 805 and board["alpaca-7b"].length_controlled_winrate == pytest.approx(26.295, abs=1e-3)


@pytest.mark.parametrize("change, message", [
    ({"preference": 3}, r"record 1, field 'preference': 3 is neither 0 \(draw\) nor in \[1, 2\]"),
    ({"preference": "strong"}, r"record 1, field 'preference': expected a number, got 'strong'"),
    ({"output_2": None}, r"record 1, field 'output_2': expected str"),
])
def test_a_bad_annotation_is_refused_with_its_record_and_field(upstream_dir, tmp_path, change, message):
    from alpaca_nb.data import load_alpaca_eval_annotations

    records = json.loads((upstream_dir / "alpaca_eval_gpt4_annotations_alpaca-7b.json").read_text())[:3]
    records[1].update(change)
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(records))
    with pytest.raises(DataError, match=message):
        load_alpaca_eval_annotations(path=path)


def test_a_leaderboard_without_its_columns_is_refused(tmp_path):
    from alpaca_nb.data import load_leaderboard

    path = tmp_path / "board.csv"
    path.write_text(",win_rate\nalpaca-7b,26.4\n")
    with pytest.raises(DataError, match=r"board\.csv, line 1: missing column\(s\) standard_error"):
        load_leaderboard(path)
    path.write_text(",win_rate,standard_error,n_wins,n_wins_base,n_draws,n_total,avg_length\nm,high,1,1,1,0,2,3\n")
    with pytest.raises(DataError, match=r"board\.csv, line 2, field 'win_rate': expected a number, got 'high'"):
        load_leaderboard(path)


def test_the_derived_difficulty_file_says_it_has_no_download(isolated_cache, monkeypatch):
    from alpaca_nb.data import load_instruction_difficulty

    with pytest.raises(DataError, match=r"derived from upstream files and has no upstream download"):
        load_instruction_difficulty()


def test_instruction_difficulties_cover_alpaca_evals_805_instructions():
    from alpaca_nb.data import load_alpaca_eval_outputs, load_instruction_difficulty

    difficulty = load_instruction_difficulty()
    assert len(difficulty) == 805
    assert {a.instruction for a in load_alpaca_eval_outputs()} == set(difficulty)


def test_truthfulqa_questions_carry_their_targets_and_category():
    from alpaca_nb.data import load_truthfulqa_mc

    questions = load_truthfulqa_mc()
    assert len(questions) == 790 and questions[0].category == "Misconceptions"
    assert all(sum(q.mc1_targets.values()) == 1 for q in questions)
    assert "unknown" not in {q.category for q in questions}


def test_a_truthfulqa_question_with_two_true_mc1_answers_is_refused(upstream_dir, tmp_path):
    from alpaca_nb.data import load_truthfulqa_mc

    records = json.loads((upstream_dir / "TruthfulQA_mc_task.json").read_text())[:2]
    first_false = next(answer for answer, label in records[1]["mc1_targets"].items() if label == 0)
    records[1]["mc1_targets"][first_false] = 1
    path = tmp_path / "mc.json"
    path.write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"mc\.json, record 1, field 'mc1_targets': 2 true answers; MC1 needs exactly one"):
        load_truthfulqa_mc(path)
