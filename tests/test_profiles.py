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
    assert profile.chat_model == "" and profile.alpaca_asset == "alpaca_sample"
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


def test_as_rows_names_the_embedded_model():
    rows = dict(load_profile("laptop").as_rows())
    assert rows["chat_model"] == "embedded SmolLM2-135M-Instruct"
