"""alpaca_nb.profiles: laptop and cluster settings, the smoke overlay, clear errors."""

from __future__ import annotations

import pytest

from alpaca_nb.data import ASSETS
from alpaca_nb.profiles import ProfileError, current_profile, load_profile


def test_laptop_is_the_default_and_uses_the_embedded_model_and_sample(monkeypatch):
    monkeypatch.delenv("ALPACA_NB_PROFILE", raising=False)
    monkeypatch.delenv("ALPACA_NB_SMOKE", raising=False)
    profile = current_profile()
    assert profile.name == "laptop" and profile.device == "cpu"
    assert profile.chat_model is None and profile.alpaca_asset == "alpaca_sample"
    assert not profile.smoke


def test_cluster_names_real_models_and_the_full_52k(monkeypatch):
    monkeypatch.setenv("ALPACA_NB_PROFILE", "cluster")
    profile = current_profile()
    assert profile.device == "cuda" and profile.alpaca_asset == "alpaca_data"
    assert "/" in profile.base_model and "/" in profile.chat_model  # Hub ids, not local names


def test_every_profile_names_a_known_asset():
    for name in ("laptop", "cluster"):
        assert load_profile(name).alpaca_asset in ASSETS


def test_smoke_shrinks_sizes(monkeypatch):
    monkeypatch.setenv("ALPACA_NB_SMOKE", "1")
    smoke, full = current_profile(), load_profile("laptop")
    assert smoke.smoke and smoke.max_new_tokens < full.max_new_tokens and smoke.table_rows < full.table_rows


def test_unknown_profile_lists_the_choices(monkeypatch):
    monkeypatch.setenv("ALPACA_NB_PROFILE", "desktop")
    with pytest.raises(ProfileError, match="unknown profile 'desktop'.*laptop, cluster"):
        current_profile()


def test_as_rows_says_what_an_unset_setting_means():
    rows = dict(load_profile("laptop").as_rows())
    assert rows["chat_model"] == "the embedded SmolLM2-135M-Instruct" and rows["judge_budget_usd"] == "no cap"
    assert rows["truthfulqa_questions"] == "100"


def test_a_setting_left_out_is_none_and_every_optional_setting_says_what_none_means():
    from dataclasses import fields

    from alpaca_nb.profiles import UNSET_MEANS, Profile

    optional = {field.name for field in fields(Profile) if field.type.endswith("| None")}
    assert optional == set(UNSET_MEANS)
    laptop, cluster = load_profile("laptop"), load_profile("cluster")
    assert (laptop.teacher_base_url, laptop.generate_budget_usd, laptop.finetune_max_steps) == (None, None, None)
    assert (cluster.truthfulqa_questions, cluster.eval_probes, cluster.judge_budget_usd) == (None, None, 1.0)


@pytest.mark.parametrize("line", ['chat_model = ""', "judge_budget_usd = 0.0", "finetune_max_steps = 0"])
def test_an_old_sentinel_is_refused_with_the_setting_and_the_fix(monkeypatch, line):
    import tomllib

    from alpaca_nb import profiles

    table = profiles.profile_table()
    table["laptop"].update(tomllib.loads(line))
    monkeypatch.setattr(profiles, "profile_table", lambda: table)
    key = line.split(" = ")[0]
    with pytest.raises(ProfileError, match=rf"\[laptop\], {key} = .*: leave the setting out for"):
        load_profile("laptop")


# --------------------------------------------------------------------------- the stand-in overlay


def test_stand_in_variables_replace_only_where_the_profile_runs(monkeypatch, tiny_llama):
    monkeypatch.setenv("ALPACA_NB_PROFILE", "cluster")
    monkeypatch.setenv("ALPACA_NB_TEACHER_BASE_URL", "http://gpu-node:8000/v1/")
    monkeypatch.setenv("ALPACA_NB_TEACHER_MODEL", "meta-llama/Llama-3.1-70B-Instruct")
    monkeypatch.setenv("ALPACA_NB_BASE_MODEL", str(tiny_llama))
    monkeypatch.setenv("ALPACA_NB_DEVICE", "cpu")
    monkeypatch.setenv("ALPACA_NB_JUDGE_BASE_URL", "")  # empty: unset, the profile's own
    profile, shipped = current_profile(), load_profile("cluster", stand_ins={})
    assert profile.stand_ins == ("device", "base_model", "teacher_base_url", "teacher_model")
    assert profile.teacher_base_url == "http://gpu-node:8000/v1" and profile.device == "cpu"
    assert profile.base_model == str(tiny_llama) and profile.judge_base_url == shipped.judge_base_url
    unchanged = {key for key in vars(shipped) if key not in profile.stand_ins and key != "stand_ins"}
    assert all(getattr(profile, key) == getattr(shipped, key) for key in unchanged)
    rows = dict(profile.as_rows())
    assert rows["device"] == "cpu (stand-in: ALPACA_NB_DEVICE)" and rows["judge_base_url"] == shipped.judge_base_url
    assert "stand_ins" not in rows


@pytest.mark.parametrize("variable, value, message", [
    ("ALPACA_NB_DEVICE", "gpu0", "not a torch device"),
    ("ALPACA_NB_TEACHER_BASE_URL", "gpu-node:8000/v1", r"http\(s\)://host"),
    ("ALPACA_NB_MODERATION_BASE_URL", "ftp://host/v1", "POST /moderations"),
    ("ALPACA_NB_FINETUNE_ASSET", "eval_instructions", "an Alpaca-format asset"),
    ("ALPACA_NB_BASE_MODEL", "/no/such/model", "no model folder there"),
    ("ALPACA_NB_EVAL_INSTRUCTIONS", "5", "not a stand-in setting"),
])
def test_a_bad_stand_in_is_refused_naming_its_variable(monkeypatch, variable, value, message):
    monkeypatch.setenv("ALPACA_NB_PROFILE", "cluster")
    monkeypatch.setenv(variable, value)
    with pytest.raises(ProfileError, match=rf"{variable}.*{message}"):
        current_profile()


def test_stand_ins_lie_over_the_smoke_sizes_and_an_explicit_overlay_ignores_the_environment(monkeypatch):
    monkeypatch.setenv("ALPACA_NB_DEVICE", "cpu")
    smoke = load_profile("cluster", smoke=True)
    assert smoke.smoke and smoke.device == "cpu" and smoke.eval_instructions < load_profile("cluster").eval_instructions
    assert load_profile("cluster", stand_ins={}).device == "cuda"
    with pytest.raises(ProfileError, match="not stand-in settings"):
        load_profile("cluster", stand_ins={"eval_instructions": "5"})


def test_model_labels_name_the_embedded_model_only_where_the_profile_runs_it(tiny_llama):
    laptop = load_profile("laptop", stand_ins={})
    assert {laptop.model_label(key) for key in ("chat_model", "base_model", "teacher_model", "judge_model")} == {
        "embedded model"}
    cluster = load_profile("cluster", stand_ins={"base_model": str(tiny_llama)})
    assert cluster.model_label("teacher_model") == "gpt-4o-mini" and cluster.model_label("base_model") == tiny_llama.name
    assert cluster.model_label("chat_model") == "meta-llama/Llama-3.1-8B-Instruct"
    with pytest.raises(ValueError, match="device"):
        cluster.model_label("device")
