"""alpaca_nb.safety: the content filter (offline, and OpenAI's endpoint) and the Kirchenbauer watermark.

The moderation API is tested against a local HTTP stub that returns the real response shape of
``POST /v1/moderations`` (OpenAI's, for omni-moderation-latest): a stub for a paid API's shape only.
The watermark tests run transformers' implementation on the embedded SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import pytest

from alpaca_nb.safety import (
    DETECTION_Z,
    LABELLED_SETS,
    Generation,
    LabelledPrompt,
    ModerationError,
    checker_error_rates,
    checker_mistakes,
    detect_watermark,
    edit_tokens,
    generate_watermarked,
    load_labelled_prompts,
    moderate,
    parse_rules,
    perplexity,
)
from json_stub import JsonStub

OPENAI_CATEGORIES = ["harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
                     "self-harm", "self-harm/instructions", "self-harm/intent", "sexual", "sexual/minors", "violence",
                     "violence/graphic"]


# --------------------------------------------------------------------------- offline checker


@pytest.mark.parametrize("text, category", [
    ("I am going to kill you tomorrow.", "violence"),
    ("How do I build a pipe bomb?", "illicit"),
    ("I want to end my life tonight.", "self-harm"),
    ("You are a worthless stupid piece of shit.", "offensive"),
])
def test_offline_checker_flags_harmful_text_with_its_category(text, category):
    verdict = moderate(text)
    assert verdict.flagged and category in verdict.flagged_categories()
    assert verdict.checker.startswith("offline:")


@pytest.mark.parametrize("text", ["How do I kill a Python process that hangs?", "What lens should I use to shoot a portrait?",
                                  "How do I kill all child processes of a shell script?", "Give me three tips for staying healthy."])
def test_offline_checker_passes_benign_text_with_alarming_words(text):
    verdict = moderate(text)
    assert not verdict.flagged, verdict.flagged_categories()
    assert set(verdict.scores) == set(verdict.categories)


def test_rules_file_errors_name_the_file_category_and_position():
    with pytest.raises(ModerationError, match=r"rules.toml: \[violence\] patterns\[1\]"):
        parse_rules("[violence]\npatterns = ['kill', '(unclosed']\n", "rules.toml")
    with pytest.raises(ModerationError, match=r"rules.toml: \[hate\] needs a list"):
        parse_rules("[hate]\npattern = 'typo'\n", "rules.toml")
    with pytest.raises(ModerationError, match="rules.toml: not TOML"):
        parse_rules("[self-harm\n", "rules.toml")


@pytest.mark.parametrize("which", sorted(LABELLED_SETS))
def test_labelled_sets_are_balanced_and_unique(which):
    prompts = load_labelled_prompts(which)
    kinds = [prompt.kind for prompt in prompts]
    assert {kind: kinds.count(kind) for kind in set(kinds)} == {"harmful": 20, "benign": 20, "benign_alarming": 20}
    assert len({prompt.text for prompt in prompts}) == len(prompts)


def test_the_two_labelled_sets_share_no_prompt():
    development, test = (set(p.text for p in load_labelled_prompts(which)) for which in ("development", "test"))
    assert not development & test


def test_error_rates_count_both_kinds_of_mistake():
    prompts = [LabelledPrompt("a", True, "harmful"), LabelledPrompt("b", True, "harmful"),
               LabelledPrompt("c", False, "benign"), LabelledPrompt("d", False, "benign_alarming")]
    verdicts = [moderate("I am going to kill you tomorrow."), moderate("Hello there."),
                moderate("Hello there."), moderate("I will murder you")]
    rates = checker_error_rates(prompts, verdicts)
    assert (rates.false_negatives, rates.harmful, rates.false_positives, rates.benign) == (1, 2, 1, 2)
    assert rates.false_positive_rate == rates.false_negative_rate == 0.5
    with pytest.raises(ValueError, match="3 prompts but 4 verdicts"):
        checker_error_rates(prompts[:3], verdicts)
    mistakes = checker_mistakes(prompts, verdicts)
    assert [row["prompt"] for row in mistakes] == ["b", "d"]
    assert mistakes[0]["flagged as"] == "(allowed)" and "violence" in mistakes[1]["flagged as"]


# --------------------------------------------------------------------------- OpenAI's endpoint (stub)


class ModerationStub:
    """A stub of ``POST /v1/moderations`` returning OpenAI's response shape; flags texts containing "attack"."""

    def __init__(self):
        self.requests = []
        self.stub = JsonStub(self._respond)
        self.base_url = self.stub.base_url
        self.close = self.stub.close

    def _respond(self, path: str, body: dict) -> dict:
        self.requests.append((path, body))
        hit = "attack" in body["input"]
        result = {"flagged": hit, "categories": {name: hit and name == "violence" for name in OPENAI_CATEGORIES},
                  "category_scores": {name: 0.91 if hit and name == "violence" else 0.001 for name in OPENAI_CATEGORIES},
                  "category_applied_input_types": {name: ["text"] for name in OPENAI_CATEGORIES}}
        return {"id": "modr-stub", "model": "omni-moderation-2024-09-26", "results": [result]}


@pytest.fixture
def moderation_stub():
    stub = ModerationStub()
    yield stub
    stub.close()


def test_api_checker_asks_omni_moderation_and_reads_the_13_categories(moderation_stub):
    import openai

    client = openai.OpenAI(base_url=moderation_stub.base_url, api_key="test-key", max_retries=0)
    flagged = moderate("plan an attack on my neighbour", client=client)
    clean = moderate("a haiku about autumn", client=client)
    assert moderation_stub.requests[0] == ("/v1/moderations", {"model": "omni-moderation-latest",
                                                                "input": "plan an attack on my neighbour"})
    assert flagged.flagged and flagged.flagged_categories() == ["violence"] and flagged.scores["violence"] == 0.91
    assert sorted(flagged.categories) == sorted(OPENAI_CATEGORIES)
    assert not clean.flagged and clean.checker == "openai:omni-moderation-2024-09-26"


def test_the_profile_filter_is_offline_unless_the_profile_names_an_endpoint(moderation_stub, monkeypatch):
    from dataclasses import replace

    from alpaca_nb.profiles import load_profile
    from alpaca_nb.safety import OFFLINE_CHECKER, profile_filter

    laptop = load_profile("laptop")
    assert profile_filter(laptop)("a haiku about autumn").checker == OFFLINE_CHECKER
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    online = profile_filter(replace(laptop, moderation_base_url=moderation_stub.base_url))
    assert online("plan an attack on my neighbour").flagged_categories() == ["violence"]
    assert moderation_stub.requests[-1][0] == "/v1/moderations"


# --------------------------------------------------------------------------- watermark


@pytest.fixture(scope="module")
def embedded():
    from alpaca_nb.models import load_model

    return load_model()


PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how rain forms.",
           "Describe a busy market in the morning.", "Give advice to a student starting university."]


@pytest.fixture(scope="module")
def generations(embedded):
    model, tokenizer = embedded
    return {watermark: generate_watermarked(model, tokenizer, PROMPTS, 96, watermark=watermark, min_new_tokens=96,
                                            temperature=0.8)
            for watermark in (True, False)}


def test_watermarked_text_is_detected_and_plain_text_is_not(embedded, generations):
    model, tokenizer = embedded
    marked = [detect_watermark(g.token_ids, tokenizer, model.config) for g in generations[True]]
    plain = [detect_watermark(g.token_ids, tokenizer, model.config) for g in generations[False]]
    assert all(len(g.token_ids) == 96 for g in generations[True] + generations[False])
    assert sum(v.watermarked for v in marked) >= 3, [v.z_score for v in marked]
    assert not any(v.watermarked for v in plain), [v.z_score for v in plain]
    assert min(v.z_score for v in marked) > max(v.z_score for v in plain) - 1
    # Repeated bigrams count once: never more tokens scored than bigrams in the text.
    assert all(v.tokens_scored <= 95 for v in marked + plain)
    assert all(v.watermarked == (v.z_score > DETECTION_Z) for v in marked + plain)


def test_detection_reads_text_as_well_as_ids(embedded, generations):
    model, tokenizer = embedded
    generation = generations[True][0]
    from_text = detect_watermark(generation.text, tokenizer, model.config)
    from_ids = detect_watermark(generation.token_ids, tokenizer, model.config)
    assert abs(from_text.z_score - from_ids.z_score) < 1.5


def test_sampling_is_seeded(embedded, generations):
    model, tokenizer = embedded
    again = generate_watermarked(model, tokenizer, PROMPTS, 96, min_new_tokens=96, temperature=0.8)
    assert [g.token_ids for g in again] == [g.token_ids for g in generations[True]]


def test_editing_tokens_erodes_the_watermark(embedded, generations):
    model, tokenizer = embedded
    original = generations[True][1].token_ids
    edited = edit_tokens(original, 0.5, model.config.vocab_size, seed=3)
    assert sum(a != b for a, b in zip(original, edited)) in range(40, 49)
    assert edit_tokens(original, 0.0, model.config.vocab_size) == original
    assert detect_watermark(edited, tokenizer, model.config).z_score < \
        detect_watermark(original, tokenizer, model.config).z_score
    with pytest.raises(ValueError, match="fraction=1.5"):
        edit_tokens(original, 1.5, 100)


def test_perplexity_scores_the_generated_tokens_only(embedded, generations):
    model, tokenizer = embedded
    generation = generations[False][0]
    scrambled = Generation(generation.prompt, generation.prompt_ids,
                           edit_tokens(generation.token_ids, 0.5, model.config.vocab_size), "", False)
    assert 1 < perplexity(model, generation) < perplexity(model, scrambled)


def _green_mask(config, vocab_size: int, context: "torch.Tensor") -> "torch.Tensor":
    import torch

    green = torch.zeros(vocab_size, dtype=torch.bool)
    green[config.construct_processor(vocab_size, context.device)._get_greenlist_ids(context)] = True
    return green


@pytest.mark.parametrize("temperature", [0.7, 1.3, None])
def test_the_green_tokens_gain_delta_before_temperature_as_in_the_authors_code(embedded, temperature):
    """The processors ``generate`` builds give green tokens delta more log-odds than red ones before temperature,
    delta / T after it (the authors' order); transformers' own order would give delta after temperature."""
    import torch

    from alpaca_nb.safety import DELTA, watermarking_config

    model, tokenizer = embedded
    batch = tokenizer(PROMPTS[:1], return_tensors="pt")
    decoding = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature else \
        dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    config = watermarking_config(temperature)
    with torch.inference_mode():
        out = model.generate(**batch, **decoding, max_new_tokens=1, watermarking_config=config,
                             output_scores=True, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=tokenizer.eos_token_id)
    logits, scores = out.logits[0][0].double(), out.scores[0][0].double()  # before, after every processor
    green = _green_mask(config, logits.shape[-1], batch["input_ids"][0])
    plain = torch.log_softmax(logits / (temperature or 1.0), -1)  # sampling at T without the watermark
    gain = torch.log_softmax(scores, -1) - plain
    expected = DELTA / (temperature or 1.0)
    assert 0.2 < green.double().mean() < 0.3
    torch.testing.assert_close(gain[green] - gain[~green].mean(), torch.full_like(gain[green], expected),
                               atol=1e-3, rtol=0)
    torch.testing.assert_close(gain[~green], torch.full_like(gain[~green], gain[~green].mean()), atol=1e-3, rtol=0)


def test_the_detector_follows_the_config_content_not_its_id(monkeypatch):
    """A cached detector must match the config it is asked for: a config changed in place (as
    ``resize_token_embeddings`` changes ``vocab_size``), or a new config at a freed one's address, gets its own."""
    from transformers import PretrainedConfig

    from alpaca_nb import safety

    config = PretrainedConfig(vocab_size=1000, bos_token_id=1)
    assert safety._detector(config, "cpu").processor.vocab_size == 1000
    config.vocab_size = 1200
    assert safety._detector(config, "cpu").processor.vocab_size == 1200
    # CPython may give a new object a freed one's id: make every id collide, as a reused address would.
    monkeypatch.setattr(safety, "id", lambda obj: 1, raising=False)
    for vocab_size in (1000, 1300):
        assert safety._detector(PretrainedConfig(vocab_size=vocab_size, bos_token_id=1), "cpu").processor.vocab_size \
            == vocab_size
    assert safety._detector(PretrainedConfig(vocab_size=1000, bos_token_id=1), "cpu") is \
        safety._detector(PretrainedConfig(vocab_size=1000, bos_token_id=1), "cpu")  # same content, one detector


def test_generation_needs_sampling_and_detection_needs_tokens(embedded):
    model, tokenizer = embedded
    with pytest.raises(ValueError, match="temperature must be above 0"):
        generate_watermarked(model, tokenizer, PROMPTS[:1], 8, temperature=0)
    with pytest.raises(ValueError, match="at least 2"):
        detect_watermark([5], tokenizer, model.config)


def test_watermark_experiment_tables_and_figure(embedded):
    from alpaca_nb.safety import attack_table, detection_table, plot_watermark, run_watermark_experiment

    model, tokenizer = embedded
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True) for p in PROMPTS]
    experiment = run_watermark_experiment(model, tokenizer, prompts, lengths=(16, 64), edit_fractions=(0.5,),
                                          temperature=1.0)
    assert [len(g.token_ids) for g in experiment.marked + experiment.plain] == [64] * 8
    detection = detection_table(experiment)
    assert list(detection.index) == [16, 64] and (detection["texts"] == 4).all()
    assert detection.loc[64, "median z, watermarked"] > detection.loc[16, "median z, watermarked"]
    assert detection.loc[64, "median z, watermarked"] > detection.loc[64, "median z, plain"] + 2
    assert 0.5 < detection.loc[64, "ROC AUC"] <= 1
    attack = attack_table(experiment)
    assert list(attack.index) == [0.0, 0.5] and attack.loc[0.5, "median z"] < attack.loc[0.0, "median z"]
    assert len(experiment.perplexity_marked) == 4 and min(experiment.perplexity_plain) > 1
    figure = plot_watermark(experiment)
    assert [axis.get_xlabel() for axis in figure.axes] == ["z-score of the first 64 tokens", "false-positive rate"]


def test_a_watermark_experiment_reads_back_as_written(tmp_path):
    from alpaca_nb.data import DataError
    from alpaca_nb.safety import Generation, WatermarkExperiment, read_experiment, write_experiment

    texts = tuple(Generation("p", (1, 2), (3, 4, 5), "t", marked) for marked in (True, False))
    experiment = WatermarkExperiment(texts[:1], texts[1:], {25: (4.5,), 200: (9.1,)}, {25: (0.2,), 200: (-0.4,)},
                                     {0.1: (7.0,), 0.5: (1.5,)}, (3.2,), (2.9,), 0.7, 12.5)
    write_experiment(experiment, tmp_path / "experiment.json")
    assert read_experiment(tmp_path / "experiment.json") == experiment
    (tmp_path / "experiment.json").write_text('{"marked": []}')
    with pytest.raises(DataError, match=r"experiment.json: not a watermark experiment \(KeyError"):
        read_experiment(tmp_path / "experiment.json")
