"""Chapter 3's stage: what the whole Alpaca recipe costs, and the cost claims' verdicts.

Taught in chapter 3 (book/03_costs.md). The two halves live in modules whose names say which: API dollars
(prices, token counts, the ledger, generation cost) in ``api_costs``; training compute (GPUs, FLOPs, time,
memory) in ``training_compute``. This module joins them into the recipe's cost and checks the release's
"< $500" and "3 hours on 8 A100s, < $100" against them, for the chapter and the report card alike. The
two halves' names are re-exported here, so ``from alpaca_nb.costs import price`` keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from alpaca_nb.api_costs import (
    TIKTOKEN_ENCODINGS, BudgetExceeded, GenerationCost, Ledger, LedgerEntry, Price, PriceError, count_tokens,
    generation_cost, generation_cost_table, install_tiktoken_encodings, known_models, plot_generation_cost, price,
    tiktoken_cache, tiktoken_encoding,
)
from alpaca_nb.claims import (
    PAPER_EPOCHS, PAPER_FINETUNE_GPU, PAPER_FINETUNE_GPUS, PAPER_FINETUNE_HOURS, PAPER_FINETUNE_USD,
    PAPER_GENERATION_USD, PAPER_INSTRUCTIONS,
)
from alpaca_nb.training_compute import (
    CHARS_PER_TOKEN, GPU, LLAMA_7B, SMOLLM2_135M, DataTokens, FlopEstimate, LayoutPrediction, MemoryBreakdown,
    ModelShape, TokenCounts, TrainingEstimate, TrainingPrediction, data_tokens, finetune_flops, gpu, gpu_for_device,
    implied_mfu, local_accelerator, lora_flops, lora_trainable_params, lora_training_memory, measure_matmul_tflops,
    model_shape, predict_run, predict_training, sft_token_counts, shape_from_config, training_memory, training_steps,
    training_time, zero3_offload_memory,
)

__all__ = [
    # chapter 3's own
    "CostVerdict", "EpochTokens", "RecipeCost", "alpaca_epoch_tokens", "alpaca_finetune_flops", "break_even_keep_rate",
    "RecipeTerms", "cost_verdicts", "finetune_scenarios", "max_usd_per_gpu_hour", "paper_finetune_run", "recipe_cost",
    "recipe_terms", "verdicts_frame",
    # api_costs
    "TIKTOKEN_ENCODINGS", "BudgetExceeded", "GenerationCost", "Ledger", "LedgerEntry", "Price", "PriceError",
    "count_tokens", "generation_cost", "generation_cost_table", "install_tiktoken_encodings", "known_models",
    "plot_generation_cost", "price", "tiktoken_cache", "tiktoken_encoding",
    # training_compute
    "CHARS_PER_TOKEN", "GPU", "LLAMA_7B", "SMOLLM2_135M", "DataTokens", "FlopEstimate", "LayoutPrediction",
    "MemoryBreakdown", "ModelShape", "TokenCounts", "TrainingEstimate", "TrainingPrediction", "data_tokens",
    "finetune_flops", "gpu", "gpu_for_device", "implied_mfu", "local_accelerator", "lora_flops",
    "lora_trainable_params", "lora_training_memory", "measure_matmul_tflops", "model_shape", "predict_run",
    "predict_training", "sft_token_counts", "shape_from_config", "training_memory", "training_steps",
    "training_time", "zero3_offload_memory",
]


@dataclass(frozen=True)
class RecipeCost:
    generation: GenerationCost
    finetune: TrainingEstimate
    flops: FlopEstimate

    @property
    def total_usd(self) -> float:
        return self.generation.cost_usd + self.finetune.cost_usd


def recipe_cost(*, keep_rate: float, model: str, batch: bool, gpu_name: str, n_gpus: int, mfu: float, epochs: int,
                prompt_tokens: float, completion_tokens: float, tasks_per_completion: int, n_instructions: int,
                tokens_per_epoch: float, context: float, shape: ModelShape = LLAMA_7B) -> RecipeCost:
    """Return the whole recipe's cost: generating ``n_instructions`` and fine-tuning ``shape`` on them."""
    generation = generation_cost(n_instructions, keep_rate, prompt_tokens, completion_tokens, tasks_per_completion,
                                 model, batch)
    flops = finetune_flops(shape.n_params, tokens_per_epoch, epochs, n_layers=shape.n_layers, d_model=shape.d_model,
                           context=context)
    return RecipeCost(generation, training_time(flops.total, gpu_name, n_gpus, mfu), flops)


@dataclass(frozen=True)
class RecipeTerms:
    """recipe_cost reduced to the numbers a page multiplies: the static book's calculator does this arithmetic in
    the browser (alpaca_nb/widgets_js/recipe_cost.js; tests check its figures against recipe_cost)."""

    n_instructions: int
    tasks_per_completion: int
    request_usd: dict[str, float]               # one request's dollars at each model's prices
    batch_request_usd: dict[str, float | None]  # with the batch API's discount; None where a model has none
    prices_as_of: dict[str, str]
    flops_per_epoch: float                      # FLOPs grow linearly with epochs (finetune_flops)
    gpus: dict[str, GPU]


def recipe_terms(*, prompt_tokens: float, completion_tokens: float, tasks_per_completion: int, n_instructions: int,
                 tokens_per_epoch: float, context: float, models: list[str], gpu_names: list[str],
                 shape: ModelShape = LLAMA_7B) -> RecipeTerms:
    """Return the terms of recipe_cost for these measured inputs, each model's prices and each GPU's."""
    rates = {model: price(model) for model in models}
    flops = finetune_flops(shape.n_params, tokens_per_epoch, 1, n_layers=shape.n_layers, d_model=shape.d_model,
                           context=context)
    return RecipeTerms(
        n_instructions, tasks_per_completion,
        {model: rate.cost(prompt_tokens, completion_tokens) for model, rate in rates.items()},
        {model: rate.cost(prompt_tokens, completion_tokens, batch=True) if rate.batch_discount else None
         for model, rate in rates.items()},
        {model: rate.as_of for model, rate in rates.items()}, flops.total, {name: gpu(name) for name in gpu_names})




# --------------------------------------------------------------------------- the fine-tune of the paper


@dataclass(frozen=True)
class EpochTokens:
    """One epoch over Alpaca's records, from token counts on some of them (scaled up when fewer were counted)."""

    tokens: float
    padded_tokens: float  # what upstream's trainer computes on
    context: float        # mean padded tokens per example: the length the attention term grows with
    scale: float          # records of the full data per record counted (1: counted on all of it)

    @property
    def extrapolated(self) -> bool:
        return self.scale > 1


def alpaca_epoch_tokens(counts: TokenCounts, n_records: int = PAPER_INSTRUCTIONS) -> EpochTokens:
    """Return one epoch's tokens over ``n_records`` from ``counts`` on a sample of them (its mean, scaled)."""
    if counts.examples == 0:
        raise ValueError("no records were counted: cannot extrapolate to the whole data")
    scale = n_records / counts.examples
    return EpochTokens(counts.tokens * scale, counts.padded_tokens * scale, counts.padded_tokens / counts.examples,
                       scale)


def alpaca_finetune_flops(epoch: EpochTokens, shape: ModelShape = LLAMA_7B, epochs: int = PAPER_EPOCHS) -> FlopEstimate:
    """Return the FLOPs of upstream's full fine-tune of ``shape`` on ``epoch``'s padded tokens, attention included."""
    return finetune_flops(shape.n_params, epoch.padded_tokens, epochs, n_layers=shape.n_layers, d_model=shape.d_model,
                          context=epoch.context)


def paper_finetune_run(flops: FlopEstimate) -> TrainingEstimate:
    """Return the paper's run as reported (8 A100s for 3 hours) at the utilisation those hours imply."""
    mfu = implied_mfu(flops.total, PAPER_FINETUNE_GPU, PAPER_FINETUNE_GPUS, PAPER_FINETUNE_HOURS)
    return training_time(flops.total, PAPER_FINETUNE_GPU, PAPER_FINETUNE_GPUS, mfu)


def finetune_scenarios(flops: FlopEstimate, mfu: float = 0.4) -> dict[str, TrainingEstimate]:
    """Return the same fine-tune as the paper ran it and on other hardware at ``mfu``, full and LoRA."""
    lora = lora_flops(flops).total
    return {
        f"the paper: {PAPER_FINETUNE_GPUS} x A100, {PAPER_FINETUNE_HOURS:g} h (as reported)": paper_finetune_run(flops),
        f"{PAPER_FINETUNE_GPUS} x A100 at {mfu:.0%} MFU": training_time(flops.total, PAPER_FINETUNE_GPU,
                                                                       PAPER_FINETUNE_GPUS, mfu),
        f"1 x H100 at {mfu:.0%} MFU": training_time(flops.total, "H100-80GB", 1, mfu),
        f"LoRA, 1 x H100 at {mfu:.0%} MFU": training_time(lora, "H100-80GB", 1, mfu),
        f"LoRA, 1 x RTX 4090 at {mfu:.0%} MFU": training_time(lora, "RTX-4090", 1, mfu),
    }


def max_usd_per_gpu_hour() -> float:
    """Return the highest GPU-hour price at which the paper's run stays under its "< $100"."""
    return PAPER_FINETUNE_USD / (PAPER_FINETUNE_GPUS * PAPER_FINETUNE_HOURS)


def break_even_keep_rate(at_full_keep: GenerationCost, claimed_usd: float = PAPER_GENERATION_USD) -> float:
    """Return the keep rate above which generating the data costs less than ``claimed_usd`` (cost scales as 1/rate)."""
    if at_full_keep.keep_rate != 1.0:
        raise ValueError(f"keep_rate={at_full_keep.keep_rate}: pass the cost at a keep rate of 1")
    return at_full_keep.cost_usd / claimed_usd


# --------------------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class CostVerdict:
    claim: str
    we_compute: str
    why_they_differ: str


def cost_verdicts(at_full_keep: GenerationCost, flops: FlopEstimate, tokens_extrapolated: bool) -> list[CostVerdict]:
    """Return the release's three cost claims beside what the measured tokens, prices and FLOPs give."""
    limit = training_time(flops.total, PAPER_FINETUNE_GPU, PAPER_FINETUNE_GPUS, mfu=1.0)
    paper_run = paper_finetune_run(flops)
    gpu_hours = PAPER_FINETUNE_GPUS * PAPER_FINETUNE_HOURS
    return [
        CostVerdict(
            f"generation < ${PAPER_GENERATION_USD:,.0f} ({at_full_keep.model}, 2023)",
            f"${at_full_keep.cost_usd:,.0f} at 100 % keep, ${PAPER_GENERATION_USD:,.0f} at "
            f"{break_even_keep_rate(at_full_keep):.0%} keep",
            "the paper gives no keep rate; ours depends on it and on measured tokens per request"),
        CostVerdict(
            f"fine-tuning {PAPER_FINETUNE_HOURS:g} h on {PAPER_FINETUNE_GPUS} x A100",
            f"{limit.wall_hours * 60:.0f} min at 100 % of peak; {PAPER_FINETUNE_HOURS:g} h means {paper_run.mfu:.1%} MFU",
            "upstream FSDP on 7B with batch 4 per GPU is far from peak; our tokens are "
            + ("extrapolated from a sample with another tokenizer" if tokens_extrapolated else "measured")),
        CostVerdict(
            f"fine-tuning < ${PAPER_FINETUNE_USD:,.0f}",
            f"${paper_run.cost_usd:,.2f} for {gpu_hours:g} A100-hours at {gpu(PAPER_FINETUNE_GPU).as_of} prices",
            f"today's on-demand list price; the paper's ${PAPER_FINETUNE_USD:,.0f} for {gpu_hours:g} A100-hours needs "
            f"at most ${max_usd_per_gpu_hour():.2f} per hour"),
    ]


def verdicts_frame(verdicts: list[CostVerdict]) -> pd.DataFrame:
    """Return the verdicts as the chapter's table: claim, what we compute, why they differ."""
    return pd.DataFrame([{"claim": v.claim, "we compute": v.we_compute, "why they differ": v.why_they_differ}
                         for v in verdicts])
