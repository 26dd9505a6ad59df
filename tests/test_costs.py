"""alpaca_nb.costs: the price table, token counts, and the ledger's sums, restart and budget."""

from __future__ import annotations

import json

import pytest
import tiktoken

from alpaca_nb.costs import BudgetExceeded, Ledger, LedgerEntry, PriceError, count_tokens, known_models, price
from alpaca_nb.llm import CallRecord


def call(model="gpt-4o-mini", prompt=1000, completion=500, outcome="ok", attempt=1) -> CallRecord:
    return CallRecord(model=model, api="chat", outcome=outcome, status=200 if outcome == "ok" else 500, error="",
                      prompt_tokens=prompt, completion_tokens=completion, latency_s=0.5, finish_reason="stop",
                      request_id="r", attempt=attempt)


def test_price_table_rows_are_dated_and_sourced():
    for model in known_models():
        row = price(model)
        assert row.input_per_1m >= 0 and row.output_per_1m >= 0 and 0 <= row.batch_discount < 1
        assert len(row.as_of) >= 7 and row.as_of[:4].isdigit() and row.source


def test_davinci_is_two_cents_per_thousand_tokens_both_ways():
    davinci = price("text-davinci-003")
    assert davinci.cost(1000, 0) == pytest.approx(0.02) and davinci.cost(0, 1000) == pytest.approx(0.02)
    assert davinci.as_of == "2023-03"


def test_dated_snapshots_and_prefixes_price_as_their_family():
    assert price("gpt-4o-mini-2024-07-18") == price("gpt-4o-mini") == price("openai/gpt-4o-mini")


def test_unknown_model_raises_listing_known_models():
    with pytest.raises(PriceError, match=r"no price known for model 'llama-9000'; known models: .*gpt-4o-mini"):
        price("llama-9000")


def test_batch_discount_halves_the_bill():
    assert price("gpt-4.1").cost(1_000_000, 1_000_000, batch=True) == pytest.approx(5.0)


def test_token_counts_match_tiktoken():
    assert count_tokens("hello world", "text-davinci-003") == 2
    text = "Give three tips for staying healthy. Übermäßig 🤖 tokens!"
    assert count_tokens(text, "text-davinci-003") == len(tiktoken.get_encoding("p50k_base").encode(text))
    assert count_tokens(text, "gpt-4o-mini") == len(tiktoken.get_encoding("o200k_base").encode(text))


def test_embedded_model_counts_with_its_own_tokenizer():
    assert 2 <= count_tokens("hello world", "smollm2-135m-instruct") <= 3


def test_ledger_sums_by_model_and_stage(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.record(call(), stage="generate")
    ledger.record(call(outcome="retry", prompt=0, completion=0), stage="generate")
    ledger.record(call(model="text-davinci-003", prompt=1000, completion=1000), stage="judge")
    assert ledger.total_usd == pytest.approx(0.00045 + 0.04)
    by_model = ledger.summary("model")
    assert by_model.loc["gpt-4o-mini", "calls"] == 2 and by_model.loc["gpt-4o-mini", "retries"] == 1
    assert ledger.summary("stage").loc["judge", "cost_usd"] == pytest.approx(0.04)
    assert ledger.total_tokens == 1500 + 0 + 2000  # the failed retry carried no tokens


def test_ledger_survives_a_restart_and_a_torn_last_line(tmp_path):
    path = tmp_path / "ledger.jsonl"
    Ledger(path).record(call(), stage="generate")
    with path.open("a") as handle:
        handle.write('{"time": 1, "stage": "gen')  # killed mid-write
    reopened = Ledger(path)
    assert len(reopened.entries) == 1 and reopened.total_usd == pytest.approx(0.00045)
    reopened.record(call(), stage="generate")
    assert [json.loads(line)["cost_usd"] for line in path.read_text().splitlines()] == [pytest.approx(0.00045)] * 2


def test_ledger_names_the_line_of_a_corrupt_entry(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.write_text('{"not": "an entry"}\n')
    with pytest.raises(ValueError, match=r"ledger\.jsonl, line 1: not a ledger entry"):
        Ledger(path)


def test_budget_refuses_a_request_whose_worst_case_does_not_fit(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl", budget_usd=0.10)
    # text-davinci-003: 1000 prompt + 3072 completion tokens is at most $0.08144.
    assert not ledger.would_exceed("text-davinci-003", 1000, 3072)
    reservation = ledger.reserve("text-davinci-003", 1000, 3072)
    assert ledger.would_exceed("text-davinci-003", 1000, 3072)  # the in-flight reservation counts
    with pytest.raises(BudgetExceeded, match=r"budget \$0\.1000"):
        ledger.reserve("text-davinci-003", 1000, 3072)
    ledger.record(call(model="text-davinci-003", prompt=1000, completion=500), stage="generate")
    ledger.release(reservation)
    assert ledger.total_usd == pytest.approx(0.03)
    assert not ledger.would_exceed("text-davinci-003", 1000, 2000)


def test_price_as_prices_a_self_hosted_model(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl", price_as="smollm2-135m-instruct")
    ledger.record(call(model="my-vllm-model"), stage="generate")
    assert ledger.total_usd == 0.0
    with pytest.raises(PriceError):
        Ledger(tmp_path / "other.jsonl").record(call(model="my-vllm-model"), stage="generate")


def test_ledger_entry_fields_are_the_documented_format():
    assert list(LedgerEntry.__dataclass_fields__) == [
        "time", "stage", "model", "api", "outcome", "status", "error", "prompt_tokens", "completion_tokens",
        "cost_usd", "latency_s", "request_id", "attempt", "usage_estimated"]


def test_a_call_budget_holds_one_reservation_per_attempt_and_an_old_ledger_still_reads(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl", budget_usd=0.10)
    budget = ledger.call_budget("text-davinci-003", 1000, 3072)  # at most $0.08144 an attempt
    budget.reserve()
    assert (budget.held, budget.estimated_usage) == (1, (1000, 3072))
    assert ledger.reserved_usd == pytest.approx(0.08144)
    with pytest.raises(BudgetExceeded):  # a retry beside the first attempt would not fit
        budget.reserve()
    budget.release_all()
    assert budget.held == 0 and ledger.reserved_usd == 0.0
    # A line written before usage_estimated existed is read as a server-reported count.
    old = {"time": 1.0, "stage": "generate", "model": "gpt-4o-mini", "api": "chat", "outcome": "retry", "status": 500,
           "error": "500 Internal Server Error", "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0,
           "latency_s": 0.1, "request_id": "r", "attempt": 1}
    (tmp_path / "old.jsonl").write_text(json.dumps(old) + "\n")
    assert Ledger(tmp_path / "old.jsonl").entries[0].usage_estimated is False
    assert Ledger(tmp_path / "old.jsonl").summary().loc["gpt-4o-mini", "estimated"] == 0


# ----------------------------------------------------------------------------- training cost model


def test_gpu_table_rows_are_dated_sourced_and_known_gpus_listed():
    from alpaca_nb.costs import gpu

    for name in ("A100-80GB", "H100-80GB", "RTX-4090"):
        row = gpu(name)
        assert row.usd_per_hour > 0 and row.peak_bf16_tflops > 0 and row.as_of[:4].isdigit() and row.source
    assert gpu("A100-80GB").peak_bf16_tflops == 312.0
    with pytest.raises(PriceError, match="no price known for GPU 'V100'; known GPUs: A100-80GB, H100-80GB, RTX-4090"):
        gpu("V100")


def test_finetune_flops_is_six_n_d_plus_the_attention_term():
    from alpaca_nb.costs import finetune_flops, lora_flops

    estimate = finetune_flops(7e9, 1e6, epochs=3, n_layers=32, d_model=4096, context=200)
    assert estimate.dense == pytest.approx(6 * 7e9 * 3e6)
    assert estimate.attention == pytest.approx(6 * 32 * 200 * 4096 * 3e6)
    assert estimate.total == pytest.approx(1.26e17 + 4.718592e14)
    assert finetune_flops(1e9, 1e3).attention == 0.0
    assert lora_flops(estimate).dense == pytest.approx(4 * 7e9 * 3e6)


def test_training_time_and_implied_mfu_are_inverses():
    from alpaca_nb.costs import implied_mfu, training_time

    # 8 A100s at 312 TFLOP/s and 50 % MFU do 8 * 312e12 * 0.5 * 3600 = 4.4928e18 FLOPs an hour.
    estimate = training_time(4.4928e18, "A100-80GB", n_gpus=8, mfu=0.5)
    assert estimate.wall_hours == pytest.approx(1.0) and estimate.gpu_hours == pytest.approx(8.0)
    assert estimate.cost_usd == pytest.approx(8 * 2.45)
    assert implied_mfu(4.4928e18, "A100-80GB", 8, 1.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="mfu=0"):
        training_time(1.0, "A100-80GB", mfu=0)


def test_sft_token_counts_pad_each_micro_batch_to_its_longest():
    from alpaca_nb.costs import sft_token_counts
    from alpaca_nb.data import AlpacaRecord

    class WordTokenizer:  # one token per word, plus EOS as a word: easy to count by hand
        eos_token = " </s>"

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": text.split()}

    records = [AlpacaRecord("a", "", "b"), AlpacaRecord("a b c", "", "d e f g h i j k l m n o p")]
    counts = sft_token_counts(records, WordTokenizer(), max_length=30, micro_batch=2)
    short = len(("Below is an instruction that describes a task. Write a response that appropriately completes the "
                 "request. ### Instruction: a ### Response:b </s>").split())  # no space after "Response:", as upstream
    long = short + 2 + 11
    assert (counts.examples, counts.tokens, counts.padded_tokens, counts.truncated) == (2, short + min(long, 30), 2 * 30, 1)
    assert 0 < counts.padding_waste < 1


def test_matmul_rate_is_measured_and_positive():
    from alpaca_nb.costs import measure_matmul_tflops

    assert 0 < measure_matmul_tflops(size=128, repeats=3) < 100


def test_generation_cost_scales_inversely_with_keep_rate():
    from alpaca_nb.costs import generation_cost, generation_cost_table

    full = generation_cost(52002, 1.0, 800, 1600, 16, "text-davinci-003")
    assert full.requests == pytest.approx(52002 / 16)
    assert full.cost_usd == pytest.approx(52002 / 16 * 2400 * 0.02 / 1000)
    assert generation_cost(52002, 0.5, 800, 1600, 16, "text-davinci-003").cost_usd == pytest.approx(2 * full.cost_usd)
    table = generation_cost_table(52002, [0.5, 1.0], 800, 1600, 16, [("gpt-4o-mini", True)])
    assert list(table.columns) == ["keep 50%", "keep 100%"] and "batch API" in table.index[0]
    with pytest.raises(ValueError, match="keep_rate=0"):
        generation_cost(1, 0, 1, 1, 16, "gpt-4o-mini")


def test_repriced_ledger_uses_the_other_models_rates(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl", price_as="smollm2-135m-instruct")
    ledger.record(call(model="smollm2-135m-instruct", prompt=1000, completion=1000), stage="generate")
    assert ledger.total_usd == 0.0 and ledger.repriced_usd("text-davinci-003") == pytest.approx(0.04)


def test_recipe_cost_adds_generation_and_finetuning():
    from alpaca_nb.costs import LLAMA_7B, recipe_cost

    cost = recipe_cost(keep_rate=1.0, model="text-davinci-003", batch=False, gpu_name="A100-80GB", n_gpus=8, mfu=0.5,
                       epochs=1, prompt_tokens=800, completion_tokens=1600, tasks_per_completion=16,
                       n_instructions=16, tokens_per_epoch=4.4928e18 / (6 * LLAMA_7B.n_params), context=0.0)
    assert cost.generation.cost_usd == pytest.approx(0.048)
    assert cost.finetune.wall_hours == pytest.approx(1.0)
    assert cost.total_usd == pytest.approx(0.048 + 8 * 2.45)


def test_training_memory_is_sixteen_bytes_per_parameter_sharded_by_fsdp_plus_activations():
    from alpaca_nb.costs import LLAMA_7B, training_memory

    alone = training_memory(LLAMA_7B.n_params, 1)
    assert (alone.weights, alone.gradients, alone.optimizer) == (4 * 6.74e9, 4 * 6.74e9, 8 * 6.74e9)
    assert alone.activations == 34 * 512 * 4 * 4096 * 32  # Korthikanti et al.: 34·s·b·h per layer
    replicated = training_memory(LLAMA_7B.n_params, 8, sharded=False)
    sharded = training_memory(LLAMA_7B.n_params, 8, sharded=True)
    assert replicated == alone  # DDP keeps a whole copy on every GPU
    assert sharded.optimizer == alone.optimizer / 8 and sharded.activations == alone.activations
    assert alone.total / 2**30 > 100 > 80 > sharded.total / 2**30 > 20  # over an 80 GB A100 alone, under it sharded


def test_lora_memory_is_bf16_frozen_weights_plus_float32_adapters_and_activations():
    from alpaca_nb.costs import LLAMA_7B, lora_training_memory, training_memory

    lora = lora_training_memory(LLAMA_7B.n_params, trainable_params=4.2e6)
    full = training_memory(LLAMA_7B.n_params)
    assert lora.weights == 2 * LLAMA_7B.n_params + 4 * 4.2e6 and lora.optimizer == 8 * 4.2e6
    assert lora.activations == full.activations
    assert 20 < lora.total / 2**30 < 24 < full.total / 2**30  # the appendix's "about 23 GB": only just on 24 GB


def test_costs_keeps_every_public_name_of_its_two_halves():
    import alpaca_nb.api_costs as api_costs
    import alpaca_nb.costs as costs
    import alpaca_nb.training_compute as training_compute

    halves = (set(api_costs.__all__) - {"price_file"}) | set(training_compute.__all__)
    assert halves <= set(costs.__all__)
    assert all(getattr(costs, name) is getattr(api_costs if name in api_costs.__all__ else training_compute, name)
               for name in halves)


def test_epoch_tokens_scale_a_sample_to_the_whole_data():
    from alpaca_nb.costs import TokenCounts, alpaca_epoch_tokens

    epoch = alpaca_epoch_tokens(TokenCounts(examples=100, tokens=15_000, padded_tokens=20_000, truncated=0))
    assert epoch.scale == pytest.approx(520.02)
    assert epoch.padded_tokens == pytest.approx(20_000 * 520.02)
    assert epoch.context == 200 and epoch.extrapolated
    assert not alpaca_epoch_tokens(TokenCounts(10, 100, 120, 0), n_records=10).extrapolated
    with pytest.raises(ValueError, match="no records"):
        alpaca_epoch_tokens(TokenCounts(0, 0, 0, 0))


def test_the_papers_run_takes_three_hours_on_eight_a100s_and_the_scenarios_share_its_flops():
    from alpaca_nb.costs import FlopEstimate, finetune_scenarios, paper_finetune_run

    flops = FlopEstimate(dense=2e19, attention=1e18, epochs=3)
    paper = paper_finetune_run(flops)
    assert (paper.n_gpus, paper.gpu, paper.wall_hours) == (8, "A100-80GB", pytest.approx(3.0))
    scenarios = finetune_scenarios(flops, mfu=0.4)
    assert list(scenarios.values())[0] == paper
    lora = scenarios["LoRA, 1 x H100 at 40% MFU"]
    full = scenarios["1 x H100 at 40% MFU"]
    assert lora.wall_hours < full.wall_hours  # no weight gradients for the frozen model


def test_cost_verdicts_derive_the_break_even_figures_from_the_claims():
    from alpaca_nb.costs import (
        FlopEstimate, break_even_keep_rate, cost_verdicts, generation_cost, max_usd_per_gpu_hour, verdicts_frame,
    )

    at_full_keep = generation_cost(52002, 1.0, 1000, 800, 16, "text-davinci-003")
    rate = break_even_keep_rate(at_full_keep)
    assert rate == pytest.approx(at_full_keep.cost_usd / 500)
    assert generation_cost(52002, rate, 1000, 800, 16, "text-davinci-003").cost_usd == pytest.approx(500)
    assert max_usd_per_gpu_hour() == pytest.approx(100 / 24)
    verdicts = cost_verdicts(at_full_keep, FlopEstimate(2e19, 1e18, 3), tokens_extrapolated=True)
    frame = verdicts_frame(verdicts)
    assert list(frame.columns) == ["claim", "we compute", "why they differ"] and len(frame) == 3
    assert "$4.17 per hour" in verdicts[2].why_they_differ
    assert f"{rate:.0%} keep" in verdicts[0].we_compute and "extrapolated" in verdicts[1].why_they_differ
    with pytest.raises(ValueError, match="keep rate of 1"):
        break_even_keep_rate(generation_cost(52002, 0.5, 1000, 800, 16, "text-davinci-003"))
