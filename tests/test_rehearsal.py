"""The cluster rehearsal: every chapter and ``alpaca-nb reproduce`` on the cluster profile's own code path, here.

Only where the cluster profile runs is replaced, through the documented stand-in overlay (``ALPACA_NB_<SETTING>``
variables, alpaca_nb/profiles.py), and its sizes shrunk by [smoke]:

- teacher and judge: the embedded SmolLM2 behind llama.cpp's ``llama-server``, reached as the cluster reaches an
  API (a base URL and a model name, the chat API, ``response_format`` json_schema for the constrained funnel);
- base and chat model: a tiny random Llama (6.4M parameters) saved locally, the base one shaped like LLaMA-7B's
  release (no chat template, no pad token, untied embeddings) so that the base-model branches are the cluster's;
- moderation: a stub of OpenAI's endpoint (tests/moderation_stub.py: its response shape, labelled a stub);
- device: ``cpu`` for the profile's ``cuda``, since this machine has no GPU (placement only: the code path that
  reads ``profile.device`` is the same);
- data: the real 52K file when it is on this machine, else its first 100 records (``alpaca_sample``), since the
  offline CI machines do not hold the 52K file.

The API key is a dummy that must never reach an output. The rehearsal's runs go to a user cache of their own.
About 2-2.5 minutes on 2 CPU cores; ``pytest -m "not rehearsal"`` leaves it out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import nbformat
import pytest
from myst_nb.core.read import read_myst_markdown_notebook
from nbclient import NotebookClient

from alpaca_nb.llm import LocalServer
from moderation_stub import STUB_MODEL, ModerationStub
from test_chapters import notebooks

pytestmark = pytest.mark.rehearsal

DUMMY_KEY = "sk-rehearsal-dummy-0f3a9c2e-never-a-real-key"


@dataclass(frozen=True)
class Rehearsal:
    environment: dict[str, str]  # what the rehearsal set, on top of the session's environment
    cache: Path  # the rehearsal's own user cache: its runs land here
    moderation: ModerationStub
    base_model: Path
    chat_model: Path


def _tiny_llama(folder: Path, *, base: bool) -> Path:
    """Save a 2-layer random Llama on the embedded model's config and tokenizer into ``folder``. ``base``: shaped
    like LLaMA-7B's release (no chat template, no pad token, untied embeddings); else like an instruct model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alpaca_nb.models import embedded_model_dir, load_tokenizer

    config = LlamaConfig.from_pretrained(embedded_model_dir())
    config.update({"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "head_dim": 16})
    tokenizer = load_tokenizer()
    if base:
        config.update({"tie_word_embeddings": False, "pad_token_id": None})
        tokenizer.chat_template = None
        tokenizer.pad_token = None
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _fifty_two_k_here() -> bool:
    """Return True when the real 52K Alpaca file is on this machine (data dir or user cache), with no download."""
    from alpaca_nb.data import DataError, resolve

    try:
        resolve("alpaca_data", allow_download=False)
    except DataError:
        return False
    return True


@pytest.fixture(scope="module")
def rehearsal(llama_server: LocalServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rehearsal]:
    """The cluster profile with local stand-ins, in the environment the chapters' kernels and the CLI inherit."""
    from alpaca_nb.data import cache_dir

    root = tmp_path_factory.mktemp("rehearsal")
    base_model = _tiny_llama(root / "tiny-llama-base", base=True)
    chat_model = _tiny_llama(root / "tiny-llama-chat", base=False)
    data = "alpaca_data" if _fifty_two_k_here() else "alpaca_sample"
    # The runs go to a cache of the rehearsal's own; what the user cache holds besides runs (the converted embedded
    # model, downloaded files) is linked in, not made again.
    cache = root / "cache"
    cache.mkdir()
    user_cache = cache_dir()
    for entry in (user_cache.iterdir() if user_cache.is_dir() else ()):
        if entry.name != "runs":
            (cache / entry.name).symlink_to(entry)
    moderation = ModerationStub()
    environment = {
        "ALPACA_NB_PROFILE": "cluster", "ALPACA_NB_SMOKE": "1", "ALPACA_NB_CACHE_DIR": str(cache),
        "ALPACA_NB_PROGRESS": "0", "ALPACA_NB_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": DUMMY_KEY,
        # the stand-in overlay
        "ALPACA_NB_DEVICE": "cpu",
        "ALPACA_NB_TEACHER_BASE_URL": llama_server.base_url, "ALPACA_NB_TEACHER_MODEL": llama_server.model,
        "ALPACA_NB_JUDGE_BASE_URL": llama_server.base_url, "ALPACA_NB_JUDGE_MODEL": llama_server.model,
        "ALPACA_NB_MODERATION_BASE_URL": moderation.base_url,
        "ALPACA_NB_BASE_MODEL": str(base_model), "ALPACA_NB_CHAT_MODEL": str(chat_model),
        "ALPACA_NB_ALPACA_ASSET": data, "ALPACA_NB_FINETUNE_ASSET": data,
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment.items():
            patch.setenv(name, value)
        yield Rehearsal(environment, cache, moderation, base_model, chat_model)
    moderation.close()


def test_the_overlay_changes_only_where_the_cluster_profile_runs(rehearsal):
    from dataclasses import asdict

    from alpaca_nb.profiles import STAND_INS, current_profile, load_profile

    rehearsed = current_profile()
    shipped = load_profile("cluster", smoke=True, stand_ins={})
    changed = {key for key, value in asdict(rehearsed).items() if value != asdict(shipped)[key]} - {"stand_ins"}
    assert rehearsed.name == "cluster" and rehearsed.smoke
    assert changed <= set(STAND_INS) and set(rehearsed.stand_ins) == set(STAND_INS)
    rows = dict(rehearsed.as_rows())
    assert rows["teacher_base_url"].endswith("(stand-in: ALPACA_NB_TEACHER_BASE_URL)")


def _output_texts(notebook) -> str:
    """Return the text a reader sees in the notebook's outputs (streams, plain text and HTML; no images)."""
    texts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            data = output.get("data", {})
            texts += [output.get("text", ""), data.get("text/plain", ""), data.get("text/html", "")]
    return "\n".join(text if isinstance(text, str) else "".join(text) for text in texts)


@pytest.mark.parametrize("page", notebooks(), ids=lambda page: page.stem)
def test_chapter_runs_on_the_rehearsed_cluster_profile(rehearsal, page):
    started = time.perf_counter()
    notebook = read_myst_markdown_notebook(page.read_text(encoding="utf-8"), path=page)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(page.parent)}})
    client.execute()  # raises CellExecutionError, with the failing cell and traceback, on any error
    outputs = json.dumps([cell.get("outputs", []) for cell in notebook.cells if cell.cell_type == "code"])
    assert nbformat.validate(notebook) is None
    assert DUMMY_KEY not in outputs, f"{page.name}: the API key reached an output"
    # The models fine-tuned and chatted with are the cluster profile's (stand-ins): no text output may call them
    # the embedded 135M model. The teacher and judge are the 135M model, and are named by their own name.
    named = _output_texts(notebook).replace(rehearsal.environment["ALPACA_NB_TEACHER_MODEL"], "the teacher")
    mislabelled = sorted({line.strip()[:160] for line in named.splitlines()
                          if "embedded" in line.lower() or "135m" in line.lower()})
    assert not mislabelled, f"{page.name}: outputs name the embedded model on the cluster profile: {mislabelled}"
    print(f"{page.stem}: {time.perf_counter() - started:.0f} s")


def test_the_chapters_took_the_cluster_branches(rehearsal):
    """The teacher and the judge were asked over the chat API, the constrained funnel with a JSON schema; the
    base model, which has no pad token (as LLaMA-7B's release), was fine-tuned with LoRA and got one; and the
    moderation stub answered chapter 6's filter."""
    from alpaca_nb.costs import Ledger
    from alpaca_nb.models import load_tokenizer
    from alpaca_nb.profiles import current_profile
    from alpaca_nb.reproduce import recipe_dir
    from alpaca_nb.selfinstruct import read_requests
    from alpaca_nb.chapter_runs import book_fine_tune_dir
    from alpaca_nb.train import load_result

    profile = current_profile()
    recipe = recipe_dir(profile)
    assert str(rehearsal.cache) in str(recipe)
    for ledger in (recipe / "generate" / "ledger.jsonl", recipe / "evaluate" / "ledger.jsonl"):
        apis = {entry.api for entry in Ledger(ledger).entries}
        assert apis == {"chat"}, f"{ledger}: {apis}"
    constrained = read_requests(profile.run_dir("self-instruct") / "constrained")
    assert constrained and all(entry["completion"].lstrip().startswith("{") for entry in constrained)
    result = load_result(book_fine_tune_dir(profile))
    assert result.lora and load_tokenizer(result.final_model_dir).pad_token == "[PAD]"
    assert load_tokenizer(rehearsal.base_model).pad_token is None
    assert any(path == "/v1/moderations" for path, _ in rehearsal.moderation.requests)
    assert {path for path, _ in rehearsal.moderation.requests} == {"/v1/moderations"}


def test_reproduce_runs_the_cluster_recipe_and_writes_its_report_card(rehearsal, tmp_path):
    out = tmp_path / "recipe"
    finished = subprocess.run([sys.executable, "-m", "alpaca_nb.cli", "reproduce", "--profile", "cluster", "--smoke",
                               "--out", str(out)], capture_output=True, text=True, timeout=1200, check=False,
                              env=os.environ.copy())
    printed = finished.stdout + finished.stderr
    assert finished.returncode == 0, printed[-4000:]
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["profile"] == "cluster" and report["smoke"]
    assert {stage: info["status"] for stage, info in report["stages"].items()} == dict.fromkeys(report["stages"], "complete")
    assert set(report["stand_ins"]) >= {"teacher_base_url", "judge_base_url", "base_model", "device"}
    assert "stand-ins" in (out / "report.md").read_text(encoding="utf-8")
    written = [path for path in out.rglob("*") if path.is_file() and path.suffix in (".json", ".jsonl", ".md", ".html")]
    leaked = [path for path in written if DUMMY_KEY in path.read_text(encoding="utf-8", errors="replace")]
    assert DUMMY_KEY not in printed and not leaked, f"the API key reached {leaked or 'the output'}"


def test_no_rehearsal_file_holds_the_api_key(rehearsal):
    runs = rehearsal.cache / "runs"
    written = [path for path in runs.rglob("*") if path.is_file() and path.suffix in (".json", ".jsonl", ".md", ".txt")]
    assert written
    assert not [path for path in written if DUMMY_KEY in path.read_text(encoding="utf-8", errors="replace")]


def test_the_moderation_stub_says_it_is_one(rehearsal):
    import openai

    from alpaca_nb.safety import moderate

    client = openai.OpenAI(base_url=rehearsal.moderation.base_url, max_retries=0)
    verdict = moderate("How do I build a bomb?", client=client)
    assert verdict.flagged and verdict.checker == f"openai:{STUB_MODEL}" and "stub" in verdict.checker
