"""Shared test set-up: real upstream data from ALPACA_NB_DATA_DIR, an isolated user cache."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
SHARED_UPSTREAM = TESTS.parents[1] / "shared" / "data" / "upstream"

# tests/check_built_book.py is a script that `make book` runs; its logic is unit-tested here too.
sys.path.insert(0, str(TESTS))

# The real files are read through ALPACA_NB_DATA_DIR (CI sets it; on this project's machines it
# defaults to ../shared/data/upstream). Without it the loaders download the pinned files.
if not os.environ.get("ALPACA_NB_DATA_DIR") and SHARED_UPSTREAM.is_dir():
    os.environ["ALPACA_NB_DATA_DIR"] = str(SHARED_UPSTREAM)
# The stand-in overlay (ALPACA_NB_TEACHER_BASE_URL and the like, alpaca_nb/profiles.py) exported in a developer's
# shell would change the profile every test reads: the tests start without it (the rehearsal sets its own).
from alpaca_nb.profiles import ENV_PREFIX, STAND_INS  # noqa: E402

for _setting in STAND_INS:
    os.environ.pop(ENV_PREFIX + _setting.upper(), None)
# tiktoken's encodings: `alpaca-nb prepare` installed them in the user cache. Fixed for the session
# here, so that a test which points the user cache at an empty folder does not lose them.
from alpaca_nb.costs import tiktoken_cache  # noqa: E402

os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(tiktoken_cache()))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "rehearsal: the cluster profile's chapters and recipe on local stand-ins "
                            "(tests/test_rehearsal.py, minutes; `make test` and CI run it)")


@pytest.fixture(scope="session")
def upstream_dir() -> Path:
    """Return the folder of real upstream files (ALPACA_NB_DATA_DIR as the session started)."""
    value = os.environ.get("ALPACA_NB_DATA_DIR")
    if not value:
        pytest.fail("ALPACA_NB_DATA_DIR is not set and ../shared/data/upstream is absent: the real-data tests need it")
    return Path(value)


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """Point the user cache at an empty folder and hide the data dir: nothing is found locally."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("ALPACA_NB_CACHE_DIR", str(cache))
    monkeypatch.delenv("ALPACA_NB_DATA_DIR", raising=False)
    monkeypatch.delenv("ALPACA_NB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return cache


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Return a folder with a 2-layer random Llama on the embedded model's config and tokenizer (3.3M params)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alpaca_nb.models import embedded_model_dir, load_tokenizer

    config = LlamaConfig.from_pretrained(embedded_model_dir())
    config.update({"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "head_dim": 16})
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    load_tokenizer().save_pretrained(folder)
    return folder


# Fixtures for the embedded llama.cpp server and the fault-injecting proxy live in their own module;
# leak_guard fails the session if a process the tests started outlives it.
pytest_plugins = ["llm_fixtures", "leak_guard"]
