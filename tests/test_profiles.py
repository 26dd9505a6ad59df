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
