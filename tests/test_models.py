"""alpaca_nb.models on the real embedded SmolLM2-135M-Instruct."""

from __future__ import annotations

import time

import pytest

from alpaca_nb.models import ModelError, embedded_gguf_path, embedded_model_dir, generate_reply, load_model

PROMPT = "Give three tips for staying healthy."


@pytest.fixture(scope="module")
def embedded():
    return load_model()


def test_embedded_gguf_ships_in_the_wheel():
    path = embedded_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 90_000_000


def test_embedded_model_is_converted_once_to_safetensors(embedded):
    folder = embedded_model_dir()
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    started = time.perf_counter()
    load_model()
    # A cached load is meant to take about a second; 20 s would mean it converted the GGUF again.
    assert time.perf_counter() - started < 20


def test_embedded_model_is_a_135m_llama_with_a_chat_template(embedded):
    model, tokenizer = embedded
    assert model.config.model_type == "llama"
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert "<|im_start|>" in tokenizer.chat_template
    assert not model.training


def test_greedy_reply_is_non_empty_and_identical_twice(embedded):
    model, tokenizer = embedded
    first = generate_reply(model, tokenizer, PROMPT, max_new_tokens=24)
    second = generate_reply(model, tokenizer, PROMPT, max_new_tokens=24)
    assert first.strip() and first == second
    assert "<|im_end|>" not in first


def test_sampling_is_reproducible_under_a_seed(embedded):
    model, tokenizer = embedded
    replies = [generate_reply(model, tokenizer, PROMPT, max_new_tokens=16, temperature=1.0, seed=seed) for seed in (3, 3, 4)]
    assert replies[0] == replies[1]
    assert replies[0] != replies[2]


def test_chat_messages_are_accepted(embedded):
    model, tokenizer = embedded
    messages = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "What color is the sky?"}]
    assert generate_reply(model, tokenizer, messages, max_new_tokens=8)


def test_a_missing_model_path_raises_model_error(tmp_path):
    with pytest.raises(ModelError, match="cannot load model"):
        load_model(str(tmp_path / "no-such-model"))


def test_a_local_folder_loads_like_a_hub_id(embedded):
    model, _ = load_model(str(embedded_model_dir()))
    assert model.config.vocab_size == embedded[0].config.vocab_size


def test_raw_prompt_without_chat_template_is_sent_as_is(embedded):
    """chat_template=False (chapter 4's Alpaca prompts): the text goes in untouched, so sending the chat
    template's own rendering raw gives exactly the chat reply, and a bare prompt gives a different one."""
    model, tokenizer = embedded
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                             add_generation_prompt=True)
    chat = generate_reply(model, tokenizer, PROMPT, max_new_tokens=16)
    assert generate_reply(model, tokenizer, rendered, max_new_tokens=16, chat_template=False) == chat
    assert generate_reply(model, tokenizer, PROMPT, max_new_tokens=16, chat_template=False) != chat
