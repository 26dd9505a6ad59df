"""Training compute: GPUs, FLOPs, wall time and the token counts a fine-tune computes on (memory: ``training_memory``).

Taught in chapter 3 (book/03_costs.md); chapter 4 and the cluster appendix quote its memory model. GPU rental
rates come from prices.toml beside the API prices (``api_costs.price_file``), dated and sourced.
``predict_run`` joins them into the prediction ``alpaca-nb train --dry-run`` prints before a launch (steps,
FLOPs, wall time, dollars, memory per GPU for a full fine-tune, LoRA and ZeRO-3 offload), without loading or
downloading a model; the report card sets the fine-tune's prediction beside what it took.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from alpaca_nb.api_costs import PriceError, price_file
from alpaca_nb.training_memory import (
    LLAMA_7B, SMOLLM2_135M, MemoryBreakdown, ModelShape, lora_trainable_params, lora_training_memory, model_shape,
    shape_from_config, training_memory, zero3_offload_memory,
)

__all__ = [
    "CHARS_PER_TOKEN", "GPU", "LLAMA_7B", "SMOLLM2_135M", "DataTokens", "FlopEstimate", "LayoutPrediction",
    "MemoryBreakdown", "ModelShape", "TokenCounts", "TrainingEstimate", "TrainingPrediction", "data_tokens",
    "finetune_flops", "gpu", "gpu_for_device", "implied_mfu", "local_accelerator", "lora_flops",
    "lora_trainable_params", "lora_training_memory", "measure_matmul_tflops", "model_shape", "predict_run",
    "predict_training", "sft_token_counts", "shape_from_config", "training_memory", "training_steps",
    "training_time", "zero3_offload_memory",
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


def training_time(flops: float, gpu_name: str | GPU, n_gpus: int = 1, mfu: float = 0.4) -> TrainingEstimate:
    """Return wall time, GPU-hours and rental cost of ``flops`` at a model-FLOPs utilisation ``mfu``.

    ``gpu_name`` is a name in prices.toml or a :class:`GPU` (``local_accelerator``'s measured one, say)."""
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu={mfu}: must be in (0, 1]")
    device = gpu_name if isinstance(gpu_name, GPU) else gpu(gpu_name)
    wall_hours = flops / (n_gpus * device.peak_bf16_tflops * 1e12 * mfu) / 3600
    return TrainingEstimate(device.name, n_gpus, mfu, wall_hours, wall_hours * n_gpus,
                            wall_hours * n_gpus * device.usd_per_hour)


def implied_mfu(flops: float, gpu_name: str | GPU, n_gpus: int, wall_hours: float) -> float:
    """Return the model-FLOPs utilisation that a reported wall time implies (the inverse of training_time)."""
    device = gpu_name if isinstance(gpu_name, GPU) else gpu(gpu_name)
    return flops / (n_gpus * device.peak_bf16_tflops * 1e12 * wall_hours * 3600)


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


def measure_matmul_tflops(size: int = 1024, repeats: int = 20, dtype: str = "float32", device: str = "cpu") -> float:
    """Return this machine's measured dense matmul rate in TFLOP/s (torch, best of ``repeats``) on ``device``."""
    import torch

    a = torch.randn(size, size, dtype=getattr(torch, dtype), device=device)
    b = torch.randn(size, size, dtype=getattr(torch, dtype), device=device)
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.mm(a, b)  # the first product pays for kernel selection and warm-up
    synchronize()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e12


# CUDA device names (torch.cuda.get_device_name) -> the GPU table's rows with the same bf16 tensor peak.
_DEVICE_NAMES = (("A100", "A100-80GB"), ("H100", "H100-80GB"), ("4090", "RTX-4090"))


def gpu_for_device(device_name: str) -> GPU | None:
    """Return the GPU table's row for a CUDA device name ("NVIDIA A100-SXM4-80GB"), None when none matches."""
    for fragment, name in _DEVICE_NAMES:
        if fragment in device_name:
            return gpu(name)
    return None


def local_accelerator(dtype: str = "bfloat16") -> GPU:
    """Return this machine's accelerator as a GPU row: the table's for a known CUDA GPU, else (a CPU, or a GPU
    not in prices.toml) one whose peak is a matmul measured here in ``dtype``, at no rental price."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        known = gpu_for_device(name)
        if known is not None:
            return known
        peak = measure_matmul_tflops(size=8192, repeats=5, dtype=dtype, device="cuda")
        memory_gb = round(torch.cuda.get_device_properties(0).total_memory / 1e9)
    else:
        import platform

        name = f"this CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        peak = measure_matmul_tflops(size=1024, repeats=10, dtype=dtype)
        memory_gb = 0
    return GPU(name=name, usd_per_hour=0.0, peak_bf16_tflops=peak, memory_gb=memory_gb, as_of=date.today().isoformat(),
               source=f"measured here: best {dtype} matmul (alpaca_nb.training_compute.measure_matmul_tflops)")


# --------------------------------------------------------------------------- the tokens a run computes on


# Characters per token of Alpaca examples (template, instruction, input, output), measured with the embedded
# SmolLM2 tokenizer on the 100-record sample (4.71, December 2026). LLaMA's own tokenizer is not available
# offline; its 32K-token vocabulary is smaller than SmolLM2's 49K, so it likely splits the text into more tokens.
CHARS_PER_TOKEN = 4.7
# Used only when no Alpaca records are on disk at all: the same sample's figures with that tokenizer.
_SAMPLE_MEAN_TOKENS, _SAMPLE_MEAN_PADDED_TOKENS = 118.0, 189.0


@dataclass(frozen=True)
class DataTokens:
    """How many examples a run trains on, and how many tokens each costs on average."""

    examples: int
    mean_tokens: float         # per example as trained: prompt, response and EOS, truncated at max_length
    mean_padded_tokens: float  # per example once each micro-batch is padded to its longest (upstream's collator)
    source: str                # how they were counted, for the printout


def data_tokens(records: Sequence[Any], examples: int | None = None, *, tokenizer=None, max_length: int = 512,
                micro_batch: int = 4, sample: int = 2000, seed: int = 0, source: str = "") -> DataTokens:
    """Return the tokens of ``examples`` Alpaca examples (default: all of ``records``) from an evenly spaced
    sample of at most ``sample`` of ``records``, counted with ``tokenizer`` as ``sft.tokenize_example`` does,
    or estimated from characters (``CHARS_PER_TOKEN``) without one."""
    from alpaca_nb.batching import padded_tokens, random_batches
    from alpaca_nb.sft import format_prompt

    if not records:
        raise ValueError("no records to count tokens on")
    step = max(1, len(records) // sample)
    chosen = list(records[::step])[:sample]
    lengths = []
    for record in chosen:
        prompt = format_prompt(record.instruction, record.input)
        if tokenizer is None:
            length = math.ceil((len(prompt) + len(record.output)) / CHARS_PER_TOKEN) + 1
        else:
            length = (len(tokenizer(prompt)["input_ids"])
                      + len(tokenizer(record.output, add_special_tokens=False)["input_ids"]) + 1)
        lengths.append(min(length, max_length))
    padded = padded_tokens(random_batches(len(lengths), micro_batch, seed=seed), lengths)
    how = (f"counted with {getattr(tokenizer, 'name_or_path', '') or 'the model tokenizer'}" if tokenizer is not None
           else f"estimated at {CHARS_PER_TOKEN:g} characters per token, the embedded tokenizer's ratio on Alpaca, "
                "since the model's own tokenizer is not on disk")
    counted = (f"{len(chosen):,} records" if len(chosen) == len(records)
               else f"{len(chosen):,} of {len(records):,} records")
    return DataTokens(len(records) if examples is None else examples, sum(lengths) / len(lengths),
                      padded / len(lengths), f"{how}; on {counted}{source}")


# --------------------------------------------------------------------------- the prediction


def training_steps(examples: int, epochs: float, global_batch: int, per_device_batch: int, n_processes: int,
                   max_steps: int | None = None) -> tuple[int, int]:
    """Return (optimizer steps, gradient accumulation) as Trainer counts them under accelerate.

    Each process gets ceil(ceil(examples / per_device_batch) / processes) micro-batches per epoch (accelerate
    shards the batches and repeats a few to keep them even); an epoch ends with a short accumulation, so it is
    ceil(micro-batches / accumulation) steps, and the run ceil(epochs x that) unless ``max_steps`` is set.
    Upstream's recipe on 52,002 examples: 407 steps an epoch, 1,221 in 3 epochs, on 1 GPU or 8.
    """
    per_micro_step = per_device_batch * n_processes
    if min(examples, global_batch, per_device_batch, n_processes) < 1 or global_batch % per_micro_step:
        raise ValueError(f"global batch {global_batch} is not a whole number of micro-batches of {per_device_batch} "
                         f"per device x {n_processes} processes (and every count must be at least 1)")
    accumulation = global_batch // per_micro_step
    micro_batches = math.ceil(math.ceil(examples / per_device_batch) / n_processes)
    per_epoch = math.ceil(micro_batches / accumulation)
    return (max_steps if max_steps is not None else math.ceil(epochs * per_epoch)), accumulation


@dataclass(frozen=True)
class LayoutPrediction:
    """One way of laying the run out on the GPUs: its FLOPs, time, dollars and memory per GPU."""

    layout: str
    flops: FlopEstimate
    time: TrainingEstimate
    memory_per_gpu: MemoryBreakdown
    host_memory_per_node: float = 0.0  # bytes of CPU RAM (ZeRO-3 offload keeps parameters and Adam there)
    time_is_lower_bound: bool = False  # the FLOP model ignores offload traffic: the run takes at least this long


@dataclass(frozen=True)
class TrainingPrediction:
    """What a fine-tune will cost, predicted before launch (``predict_training``; ``lines()`` prints it)."""

    model: ModelShape
    data: DataTokens
    gpu: GPU
    n_gpus: int
    mfu: float
    epochs: float
    global_batch: int
    per_device_batch: int
    accumulation: int
    steps: int
    tokens: float     # computed on over the whole run, padding included where the collator pads
    padded: bool
    lora_r: int
    lora_target_modules: tuple[str, ...]
    chosen: str       # the layout this run uses
    layouts: tuple[LayoutPrediction, ...] = field(default=())

    def layout(self, name: str) -> LayoutPrediction:
        """Return the layout named ``name`` ("full", "lora" or "zero3")."""
        return self.layouts[("full", "lora", "zero3").index(name)]

    def lines(self) -> list[str]:
        """Return the prediction as ``alpaca-nb train --dry-run`` prints it, the paper's figures beside it."""
        from alpaca_nb.claims import (PAPER_FINETUNE_GPU, PAPER_FINETUNE_GPUS, PAPER_FINETUNE_HOURS,
                                      PAPER_FINETUNE_USD, SOURCE_URL)

        m, d, g = self.model, self.data, self.gpu
        gib = 2**30
        padding = (f", {d.mean_padded_tokens:.0f} with each micro-batch of {self.per_device_batch} padded to its "
                   "longest" if self.padded else " (padding-free batches)")
        lines = [
            f"model   {m.name}: {m.n_params:.3g} parameters ({m.matmul_params:.3g} in matrix products), "
            f"{m.n_layers} layers, d_model {m.d_model}; shape only, no weights loaded",
            f"data    {d.examples:,} examples, {d.mean_tokens:.0f} tokens each on average{padding}",
            f"        ({d.source})",
            f"steps   {self.steps:,} optimizer steps: {self.epochs:g} epochs, global batch {self.global_batch} = "
            f"{self.per_device_batch} per GPU x {self.n_gpus} GPU{'s' if self.n_gpus != 1 else ''} x "
            f"{self.accumulation} accumulation",
            f"tokens  {self.tokens:.3g} computed on; 6ND FLOPs with the attention term (LoRA: 4ND)",
            f"GPUs    {self.n_gpus} x {g.name}: {g.peak_bf16_tflops:g} TFLOP/s bf16 peak, {g.memory_gb} GB, "
            f"${g.usd_per_hour:.2f} per GPU-hour as of {g.as_of}; assumed MFU {self.mfu:.0%}",
            f"        (price: {g.source})",
            "",
            f"  {'layout':48s} {'FLOPs':>9s} {'wall time':>10s} {'GPU-hours':>9s} {'dollars':>9s} "
            f"{'GiB per GPU':>11s}",
        ]
        for layout in self.layouts:
            t, memory = layout.time, layout.memory_per_gpu.total
            bound = ">=" if layout.time_is_lower_bound else ""
            fits = "" if not g.memory_gb else ("  fits" if memory <= g.memory_gb * 1e9 else "  DOES NOT FIT")
            host = (f"; {layout.host_memory_per_node / 1e9:,.0f} GB of CPU RAM per node"
                    if layout.host_memory_per_node else "")
            mark = "  <- this run" if layout.layout == self.chosen else ""
            dollars = bound + (f"${t.cost_usd:,.2f}" if t.cost_usd >= 0.01 or not t.cost_usd else f"${t.cost_usd:.2g}")
            lines.append(f"  {layout.layout:48s} {layout.flops.total:9.3g} {bound + _hours(t.wall_hours):>10s} "
                         f"{t.gpu_hours:9.1f} {dollars:>9s} {memory / gib:11.1f}{fits}{host}{mark}")
        full = self.layout("full")
        lines += ["", f"the paper (Taori et al. 2023, {SOURCE_URL}): LLaMA-7B fine-tuned in "
                  f"{PAPER_FINETUNE_HOURS:g} hours on {PAPER_FINETUNE_GPUS} 80GB A100s, less than "
                  f"${PAPER_FINETUNE_USD:,.0f}"]
        if self.gpu.name == PAPER_FINETUNE_GPU and self.n_gpus == PAPER_FINETUNE_GPUS:
            paper_mfu = implied_mfu(full.flops.total, self.gpu, self.n_gpus, PAPER_FINETUNE_HOURS)
            lines.append(f"        {PAPER_FINETUNE_HOURS:g} hours for these FLOPs would mean {paper_mfu:.1%} MFU; the "
                         f"predicted {_hours(full.time.wall_hours)} assumes {self.mfu:.0%}")
        return lines


def _hours(hours: float) -> str:
    return f"{hours:.2f} h" if hours >= 1 else f"{hours * 60:.1f} min" if hours * 60 >= 1 else f"{hours * 3600:.1f} s"


def predict_training(shape: ModelShape, data: DataTokens, *, epochs: float = 3.0, global_batch: int = 128,
                     per_device_batch: int = 4, gpu_name: str | GPU = "A100-80GB", n_gpus: int = 8, mfu: float = 0.4,
                     max_length: int = 512, max_steps: int | None = None, padded: bool = True, lora: bool = False,
                     lora_r: int = 8, lora_target_modules: Sequence[str] = ("q_proj", "v_proj")) -> TrainingPrediction:
    """Return the predicted steps, FLOPs, wall time, dollars and memory per GPU of a fine-tune of ``shape`` on
    ``data``: a full fine-tune (FSDP full shard on several GPUs), LoRA and ZeRO-3 with CPU offload.

    The tokens computed on are those of the examples seen (every epoch's, or ``max_steps`` global batches), at
    the padded mean when the collator pads (``padded``; upstream's does). FLOPs count the matrix products only
    (``ModelShape.matmul_params``), plus the attention term at the mean padded length. Memory is per GPU with
    micro-batches of ``per_device_batch`` x ``max_length`` tokens (the worst case for activations).
    """
    device = gpu_name if isinstance(gpu_name, GPU) else gpu(gpu_name)
    steps, accumulation = training_steps(data.examples, epochs, global_batch, per_device_batch, n_gpus, max_steps)
    examples_seen = steps * global_batch if max_steps is not None else epochs * data.examples
    per_example = data.mean_padded_tokens if padded else data.mean_tokens
    tokens = examples_seen * per_example
    flops = finetune_flops(shape.matmul_params, tokens, 1, n_layers=shape.n_layers, d_model=shape.d_model,
                           context=per_example)
    sizes = {"micro_batch": per_device_batch, "seq_len": max_length, "n_layers": shape.n_layers,
             "d_model": shape.d_model}
    trainable = lora_trainable_params(shape, lora_r, lora_target_modules)
    zero3_gpu, zero3_host = zero3_offload_memory(shape, n_gpus, micro_batch=per_device_batch, seq_len=max_length)
    full_name = "full fine-tune, FSDP full shard" if n_gpus > 1 else "full fine-tune, one GPU"
    targets = (", ".join(lora_target_modules) if len(lora_target_modules) <= 3
               else f"{len(lora_target_modules)} projections")
    lora_name = f"LoRA r={lora_r} on {targets}"
    layouts = (
        LayoutPrediction(full_name, flops, training_time(flops.total, device, n_gpus, mfu),
                         training_memory(shape.n_params, n_gpus, sharded=n_gpus > 1, **sizes)),
        LayoutPrediction(lora_name, lora_flops(flops), training_time(lora_flops(flops).total, device, n_gpus, mfu),
                         lora_training_memory(shape.n_params, trainable, **sizes)),
        LayoutPrediction("ZeRO-3, parameters and Adam on CPU", flops,
                         training_time(flops.total, device, n_gpus, mfu), zero3_gpu, zero3_host,
                         time_is_lower_bound=True),
    )
    return TrainingPrediction(shape, data, device, n_gpus, mfu, epochs, global_batch, per_device_batch, accumulation,
                              steps, tokens, padded, lora_r, tuple(lora_target_modules),
                              lora_name if lora else full_name, layouts)


def _model_tokenizer(model: str | os.PathLike | None):
    """Return the tokenizer of ``model`` when its files are on this machine (never downloaded), else None."""
    if model is None:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model), local_files_only=True)
    except (OSError, ValueError):
        return None


def _run_records(data: str) -> tuple[list, str]:
    """Return (records, a note on where they came from) for a run's ``data`` (an asset name or a file), never
    downloading: for an asset not on disk the 100-record sample stands in when it is on disk, else no records."""
    from alpaca_nb.data import ASSETS, DataError, load_alpaca_data, resolve

    if data not in ASSETS:
        return load_alpaca_data(Path(data).expanduser()), ""
    for name in dict.fromkeys((data, "alpaca_sample")):
        try:
            resolve(name, allow_download=False)
        except DataError:
            continue
        note = "" if name == data else f" of {name}, standing in for {data}, which is not on disk"
        return load_alpaca_data(asset=name), note
    return [], ""


def predict_run(config: Any, gpu_name: str | GPU, n_gpus: int, mfu: float = 0.4) -> TrainingPrediction:
    """Return the prediction for an ``alpaca_nb.train.TrainConfig`` on ``n_gpus`` x ``gpu_name``: the model's shape
    from its config (``model_shape``), its data's tokens from the records on disk (``data_tokens``). Nothing is
    loaded but a tokenizer already on disk; nothing is downloaded."""
    from alpaca_nb.data import ASSETS

    shape = model_shape(config.model)
    records, stand_in = _run_records(config.data)
    if records and not stand_in:
        total = len(records)
    else:  # the asset's record count as published: 52,002 for alpaca_data
        total = ASSETS[config.data].records or 0
    available = total - config.n_eval_examples
    examples = available if config.n_examples is None else min(config.n_examples, available)
    if examples < 1:
        raise ValueError(f"{config.data}: {total} records, {config.n_eval_examples} held out: nothing to train on")
    if records:
        tokens = data_tokens(records, examples, tokenizer=_model_tokenizer(config.model), max_length=config.max_length,
                             micro_batch=config.per_device_batch_size, source=stand_in)
    else:
        tokens = DataTokens(examples, _SAMPLE_MEAN_TOKENS, _SAMPLE_MEAN_PADDED_TOKENS,
                            f"no {config.data} records on disk: the 100-record sample's means, counted with the "
                            "embedded tokenizer in December 2026")
    return predict_training(
        shape, tokens, epochs=config.epochs, global_batch=config.global_batch_size,
        per_device_batch=config.per_device_batch_size, gpu_name=gpu_name, n_gpus=n_gpus, mfu=mfu,
        max_length=config.max_length, max_steps=config.max_steps, padded=not config.padding_free, lora=config.lora,
        lora_r=config.lora_r, lora_target_modules=config.lora_target_modules)
