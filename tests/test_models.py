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


def test_the_prompt_template_is_what_a_fine_tuned_folder_records_else_the_tokenizers(embedded, tmp_path):
    from alpaca_nb.models import PROMPT_FILE, prompt_template, record_prompt_template

    _, tokenizer = embedded
    assert prompt_template(None) == "chat" and prompt_template(tmp_path, tokenizer) == "chat"  # a chat model
    template = tokenizer.chat_template
    try:
        tokenizer.chat_template = None  # a base model such as LLaMA-7B
        assert prompt_template(tmp_path, tokenizer) == "alpaca"
    finally:
        tokenizer.chat_template = template
    record_prompt_template(tmp_path, "alpaca")
    assert prompt_template(tmp_path, tokenizer) == "alpaca"
    (tmp_path / PROMPT_FILE).write_text('{"prompt_template": "vicuna"}')
    with pytest.raises(ModelError, match=f"{PROMPT_FILE}, field 'prompt_template': 'vicuna'"):
        prompt_template(tmp_path)
    with pytest.raises(ValueError, match="template='vicuna'"):
        record_prompt_template(tmp_path, "vicuna")


def test_reply_prompts_a_fine_tuned_folder_with_the_alpaca_template(embedded, tmp_path, monkeypatch, capsys):
    """`alpaca-nb reply --model FOLDER`: a folder alpaca_nb fine-tuned is asked in the Alpaca format it learned,
    the embedded chat model through its chat template; --template overrides either."""
    from alpaca_nb import models
    from alpaca_nb.cli import main
    from alpaca_nb.models import record_prompt_template
    from alpaca_nb.sft import format_prompt

    folder = tmp_path / "final"
    folder.mkdir()
    for file in embedded_model_dir().iterdir():
        (folder / file.name).symlink_to(file)
    record_prompt_template(folder, "alpaca")
    sent, real = [], models.generate_reply

    def recording(model, tokenizer, prompt, **options):
        sent.append((prompt, options["chat_template"]))
        return real(model, tokenizer, prompt, **options)

    monkeypatch.setattr(models, "generate_reply", recording)
    arguments = ["reply", "Add the numbers.", "--input", "2 and 3", "--max-new-tokens", "8"]
    assert main([*arguments, "--model", str(folder)]) == 0
    assert main(arguments) == 0
    assert main([*arguments, "--model", str(folder), "--template", "chat"]) == 0
    assert sent == [(format_prompt("Add the numbers.", "2 and 3"), False), ("Add the numbers.\n\n2 and 3", True),
                    ("Add the numbers.\n\n2 and 3", True)]
    assert capsys.readouterr().out.strip()  # the replies were printed
