"""Models load on the profile's device (issue 34): what load_model asks transformers for, checked without a GPU.

The cluster profile's loads are checked by recording the arguments ``from_pretrained`` is given, with
torch told that a CUDA GPU is present; the inference helpers by a stand-in model that says it lives on the
``meta`` device and records where the tensors it is given are.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from alpaca_nb import models
from alpaca_nb.models import ModelError, inference_dtype, load_model, load_tokenizer
from alpaca_nb.profiles import load_profile

BOOK = Path(__file__).resolve().parents[1] / "book"


@pytest.fixture(autouse=True)
def _profiles_as_shipped(monkeypatch):
    """The profiles as profiles.toml has them: no stand-in overlay from the environment (the rehearsal sets one)."""
    for setting in ("device", "chat_model", "base_model"):
        monkeypatch.delenv(f"ALPACA_NB_{setting.upper()}", raising=False)


class _Loaded:
    """What the recorded ``from_pretrained`` gives back: enough of a model for the callers that only hold it."""

    def eval(self):
        return self


@pytest.fixture
def asked(monkeypatch):
    """Record every (source, keyword arguments) that AutoModelForCausalLM.from_pretrained is given."""
    calls = []
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda source, **kwargs: object())
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained",
                        lambda source, **kwargs: calls.append((str(source), kwargs)) or _Loaded())
    return calls


@pytest.fixture
def ampere(monkeypatch):
    """Tell torch a CUDA GPU with native bfloat16 (an A100, an H100) is present."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)


def test_inference_dtype_is_float32_on_the_cpu_bfloat16_on_ampere_float16_before(monkeypatch):
    assert inference_dtype(None) == inference_dtype("cpu") == torch.float32
    supported = {"native": True}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: supported["native"] or including_emulation)
    assert inference_dtype("cuda") == inference_dtype("cuda:1") == torch.bfloat16
    supported["native"] = False  # a V100 or a T4: torch emulates bfloat16 there, slowly
    assert inference_dtype("cuda") == torch.float16


def test_the_cluster_profile_loads_straight_onto_the_gpu_in_bfloat16(asked, ampere):
    profile = load_profile("cluster")
    load_model(profile.chat_model, device=profile.device)
    load_model(profile.base_model, device=profile.device)
    assert asked == [("meta-llama/Llama-3.1-8B-Instruct", {"dtype": torch.bfloat16, "device_map": "cuda"}),
                     ("huggyllama/llama-7b", {"dtype": torch.bfloat16, "device_map": "cuda"})]


def test_the_cluster_profile_loads_in_float16_on_a_gpu_without_native_bfloat16(asked, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    profile = load_profile("cluster")
    load_model(profile.base_model, device=profile.device)
    assert asked == [("huggyllama/llama-7b", {"dtype": torch.float16, "device_map": "cuda"})]


def test_the_laptop_profile_loads_in_float32_on_the_cpu_as_before(asked, monkeypatch, tmp_path):
    monkeypatch.setattr(models, "embedded_model_dir", lambda: tmp_path)
    profile = load_profile("laptop")
    assert profile.device == "cpu" and profile.chat_model is None
    load_model(profile.chat_model, device=profile.device)
    load_model()  # what every caller asked before devices were passed
    assert asked == [(str(tmp_path), {"dtype": torch.float32})] * 2  # no device_map: loaded as it always was


def test_an_explicit_dtype_wins_over_the_devices(asked, ampere):
    load_model("some/model", dtype=torch.float32, device="cuda")
    assert asked == [("some/model", {"dtype": torch.float32, "device_map": "cuda"})]


def test_a_cuda_device_without_a_gpu_is_refused_before_anything_loads(asked, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError, match="device 'cuda'.*no CUDA GPU"):
        load_model("huggyllama/llama-7b", device="cuda")
    assert asked == []
    from alpaca_nb.cli import main

    monkeypatch.setenv("ALPACA_NB_PROFILE", "cluster")
    assert main(["reply", "Hello", "--model", "huggyllama/llama-7b"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


# --------------------------------------------------------------------------- every caller passes the profile's


@pytest.fixture
def cluster(monkeypatch, asked, ampere):
    monkeypatch.setenv("ALPACA_NB_PROFILE", "cluster")
    monkeypatch.delenv("ALPACA_NB_SMOKE", raising=False)
    return asked


ON_THE_GPU = {"dtype": torch.bfloat16, "device_map": "cuda"}


def test_the_served_demo_loads_on_the_profiles_device(cluster, tmp_path):
    from alpaca_nb.demo import ServedDemo

    ServedDemo(model="some/model", flags_path=str(tmp_path / "flags.jsonl")).build(check=lambda text: None)
    assert cluster == [("some/model", ON_THE_GPU)]


def test_the_recipes_evaluation_loads_the_fine_tune_on_the_profiles_device(cluster, tmp_path):
    from alpaca_nb.reproduce import _load_tuned, _Run

    _load_tuned(_Run(load_profile("cluster"), tmp_path, None))
    assert cluster == [(str(tmp_path / "fine_tune" / "run" / "final"), ON_THE_GPU)]


def test_the_reply_and_evaluate_commands_load_on_the_profiles_device(cluster, monkeypatch, tmp_path):
    from alpaca_nb import evaluate
    from alpaca_nb.cli import main

    class Reached(Exception):
        pass

    def stop(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(models, "generate_reply", lambda *args, **kwargs: "a reply")
    monkeypatch.setattr(evaluate, "run_evaluation", stop)
    assert main(["reply", "Hello", "--model", "some/model", "--template", "chat"]) == 0
    with pytest.raises(Reached):
        main(["evaluate", "--out", str(tmp_path), "--model", "some/model", "--template", "chat", "--no-judge"])
    assert cluster == [("some/model", ON_THE_GPU)] * 2


def _code_cell_lines(page: Path) -> list[str]:
    """Return the lines of a MyST notebook's code cells (not its prose)."""
    cells = re.findall(r"^```\{code-cell\}[^\n]*\n(.*?)^```", page.read_text(encoding="utf-8"), re.M | re.S)
    return [line for cell in cells for line in cell.splitlines()]


def test_every_chapter_cell_that_loads_a_model_passes_the_profiles_device():
    loads = [(page.name, line) for page in sorted(BOOK.glob("*.md"))
             for line in _code_cell_lines(page) if re.search(r"\bload_model\(", line)]
    assert len(loads) >= 6  # intro, chapter 4 (twice), chapter 5 (twice), chapter 6
    assert [load for load in loads if "device=profile.device" not in load[1]] == []


# --------------------------------------------------------------------------- inputs go where the model is


class _Reached(Exception):
    """The helper handed the model its tensors: the test has seen where they are."""


class _ModelElsewhere:
    """A model that says it lives on the ``meta`` device (as a GPU model says cuda:0) and records its inputs."""

    device = torch.device("meta")

    def __init__(self):
        from transformers import GenerationConfig, LlamaConfig

        self.config = LlamaConfig(vocab_size=49152)
        self.generation_config = GenerationConfig(eos_token_id=2)
        self.devices: list[str] = []

    def _reach(self, *tensors):
        self.devices.extend(tensor.device.type for tensor in tensors)
        raise _Reached

    def generate(self, input_ids, attention_mask=None, **kwargs):
        self._reach(input_ids, *([attention_mask] if attention_mask is not None else []))

    def get_decoder(self):
        return lambda input_ids, **kwargs: self._reach(input_ids)

    def __call__(self, input_ids, **kwargs):
        self._reach(input_ids)


def _inference_helpers():
    from alpaca_nb.data import AlpacaRecord
    from alpaca_nb.demo import ChatDemo
    from alpaca_nb.evaluate import greedy_replies
    from alpaca_nb.truthfulqa import _PrefixScorer
    from alpaca_nb.safety import Generation, generate_watermarked, perplexity

    record = AlpacaRecord(instruction="Name a colour.", input="", output="Blue.")
    return {
        "models.generate_reply": lambda model, tokenizer: models.generate_reply(model, tokenizer, "Hi", max_new_tokens=2),
        "evaluate.greedy_replies": lambda model, tokenizer: greedy_replies(model, tokenizer, [record], 2),
        "hallucination (TruthfulQA scorer)": lambda model, tokenizer: _PrefixScorer(model, tokenizer, "Q: Why?\nA:"),
        "safety.generate_watermarked": lambda model, tokenizer: generate_watermarked(model, tokenizer, ["Hi"], 2),
        "safety.perplexity": lambda model, tokenizer: perplexity(model, Generation("Hi", (1, 2), (3, 4), "", True)),
        "demo.ChatDemo": lambda model, tokenizer: ChatDemo(model, tokenizer, check=_allow, flags_path="unused").reply(
            "Name a colour."),
    }


def _allow(text):
    from alpaca_nb.safety import Moderation

    return Moderation(False, {}, {}, "test: allows everything")


@pytest.mark.parametrize("helper", list(_inference_helpers()))
def test_inference_helpers_put_their_inputs_on_the_models_device(helper):
    model, tokenizer = _ModelElsewhere(), load_tokenizer()
    with pytest.raises(_Reached):
        _inference_helpers()[helper](model, tokenizer)
    assert model.devices and set(model.devices) == {"meta"}
