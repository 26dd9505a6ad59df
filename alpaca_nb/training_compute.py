"""Training compute: GPUs, FLOPs, wall time, memory and the token counts a fine-tune computes on.

Taught in chapter 3 (book/03_costs.md); chapter 4 and the cluster appendix quote its memory model. GPU rental
rates come from prices.toml beside the API prices (``api_costs.price_file``), dated and sourced.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache

from alpaca_nb.api_costs import PriceError, price_file

__all__ = [
    "GPU", "LLAMA_7B", "FlopEstimate", "MemoryBreakdown", "ModelShape", "TokenCounts", "TrainingEstimate",
    "finetune_flops", "gpu", "implied_mfu", "lora_flops", "lora_training_memory", "measure_matmul_tflops",
    "sft_token_counts", "training_memory", "training_time",
]


@dataclass(frozen=True)
class GPU:
    name: str
    usd_per_hour: float
    peak_bf16_tflops: float
    memory_gb: int
    as_of: str
    source: str


@lru_cache(maxsize=1)
def _gpu_table() -> dict[str, GPU]:
    return {name: GPU(name=name, **row) for name, row in price_file()["gpus"].items()}


def gpu(name: str) -> GPU:
    """Return the dated rental price and bf16 peak of a GPU; PriceError listing the known GPUs if unknown."""
    table = _gpu_table()
    if name not in table:
        raise PriceError(f"no price known for GPU {name!r}; known GPUs: {', '.join(sorted(table))}")
    return table[name]


@dataclass(frozen=True)
class FlopEstimate:
    dense: float      # 6 * N * D: forward (2N) and backward (4N) per token
    attention: float  # 6 * layers * context * d_model * D: the score and value products, shown apart
    epochs: int

    @property
    def total(self) -> float:
        return self.dense + self.attention


def finetune_flops(n_params: float, n_tokens: float, epochs: int = 1, *, n_layers: int = 0, d_model: int = 0,
                   context: float = 0.0) -> FlopEstimate:
    """Return the training FLOPs of a full fine-tune: 6·N·D, plus the attention term when its shape is given.

    ``context`` is the mean attended length per token's sequence (Kaplan et al. 2020, table 1: forward
    2N + 2·n_layer·n_ctx·d per token; training is three forward passes' worth).
    """
    tokens = n_tokens * epochs
    return FlopEstimate(dense=6.0 * n_params * tokens, attention=6.0 * n_layers * context * d_model * tokens, epochs=epochs)


def lora_flops(full: FlopEstimate) -> FlopEstimate:
    """Return LoRA's FLOPs for the same run: no weight gradients for the frozen base, so 4N instead of 6N per token
    (the adapters' own few million parameters are negligible)."""
    return FlopEstimate(dense=full.dense * 4 / 6, attention=full.attention, epochs=full.epochs)


@dataclass(frozen=True)
class TrainingEstimate:
    gpu: str
    n_gpus: int
    mfu: float
    wall_hours: float
    gpu_hours: float
    cost_usd: float


def training_time(flops: float, gpu_name: str, n_gpus: int = 1, mfu: float = 0.4) -> TrainingEstimate:
    """Return wall time, GPU-hours and rental cost of ``flops`` at a model-FLOPs utilisation ``mfu``."""
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu={mfu}: must be in (0, 1]")
    device = gpu(gpu_name)
    wall_hours = flops / (n_gpus * device.peak_bf16_tflops * 1e12 * mfu) / 3600
    return TrainingEstimate(gpu_name, n_gpus, mfu, wall_hours, wall_hours * n_gpus, wall_hours * n_gpus * device.usd_per_hour)


def implied_mfu(flops: float, gpu_name: str, n_gpus: int, wall_hours: float) -> float:
    """Return the model-FLOPs utilisation that a reported wall time implies (the inverse of training_time)."""
    return flops / (n_gpus * gpu(gpu_name).peak_bf16_tflops * 1e12 * wall_hours * 3600)


@dataclass(frozen=True)
class TokenCounts:
    examples: int
    tokens: int         # real tokens, each example truncated to max_length as upstream
    padded_tokens: int  # what the upstream trainer computes on: micro-batches padded to their longest example
    truncated: int      # examples longer than max_length

    @property
    def padding_waste(self) -> float:
        return 1.0 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0


def sft_token_counts(records, tokenizer, max_length: int = 512, micro_batch: int = 4, seed: int = 0) -> TokenCounts:
    """Return the tokens of the Alpaca-formatted records, with and without upstream-style padding.

    Upstream samples micro-batches in random order and pads each to its longest example; the same
    is simulated here with a seeded shuffle.
    """
    from alpaca_nb.batching import padded_tokens, random_batches
    from alpaca_nb.sft import format_example

    lengths = []
    for record in records:
        prompt, target = format_example(record, tokenizer.eos_token or "")
        lengths.append(len(tokenizer(prompt + target, add_special_tokens=True)["input_ids"]))
    truncated = sum(length > max_length for length in lengths)
    lengths = [min(length, max_length) for length in lengths]
    padded = padded_tokens(random_batches(len(lengths), micro_batch, seed=seed), lengths)
    return TokenCounts(len(lengths), sum(lengths), padded, truncated)


def measure_matmul_tflops(size: int = 1024, repeats: int = 20, dtype: str = "float32") -> float:
    """Return this machine's measured dense matmul rate in TFLOP/s (torch, best of ``repeats``)."""
    import torch

    a = torch.randn(size, size, dtype=getattr(torch, dtype))
    b = torch.randn(size, size, dtype=getattr(torch, dtype))
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e12



@dataclass(frozen=True)
class ModelShape:
    name: str
    n_params: float
    n_layers: int
    d_model: int


# Touvron et al. 2023, LLaMA table 2: 6.7B parameters, 32 layers, dimension 4096.
LLAMA_7B = ModelShape("LLaMA-7B", 6.74e9, 32, 4096)


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per GPU for a full fine-tune with AdamW in mixed precision (float32 master weights)."""

    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


def training_memory(n_params: float, n_gpus: int = 1, sharded: bool = False, *, micro_batch: int = 4,
                    seq_len: int = 512, n_layers: int = 32, d_model: int = 4096) -> MemoryBreakdown:
    """Return per-GPU memory for a full fine-tune: float32 weights (4 B/param), gradients (4 B), Adam's two moments
    (8 B) — divided by ``n_gpus`` when ``sharded`` (FSDP full shard / ZeRO-3) — plus activations.

    Activations use the rough 34·s·b·h bytes per layer of Korthikanti et al. (2022) for bf16 without
    recomputation (attention scores omitted: flash/SDPA attention does not keep them).
    """
    share = n_gpus if sharded else 1
    activations = 34 * seq_len * micro_batch * d_model * n_layers
    return MemoryBreakdown(4 * n_params / share, 4 * n_params / share, 8 * n_params / share, activations)


def lora_training_memory(n_params: float, trainable_params: float, *, micro_batch: int = 4, seq_len: int = 512,
                         n_layers: int = 32, d_model: int = 4096) -> MemoryBreakdown:
    """Return one GPU's memory for LoRA: frozen weights in bf16 (2 B/param), the adapters in float32 with their
    gradients and Adam moments (16 B per trainable parameter), and the same activations as ``training_memory``.

    Chapters 3 and 4 and the cluster appendix quote this one answer for "does a 7B LoRA fit on a 24 GB GPU".
    """
    activations = 34 * seq_len * micro_batch * d_model * n_layers
    return MemoryBreakdown(2 * n_params + 4 * trainable_params, 4 * trainable_params, 8 * trainable_params, activations)
