"""Fine-tune a causal LM on Alpaca data with transformers' Trainer: the upstream recipe and a laptop preset.

Taught in chapter 4 (book/04_fine_tuning.md); the cluster commands are in book/appendix_cluster.md.
``python -m alpaca_nb.train --preset laptop|upstream ...`` runs the same code on a laptop CPU, under
``accelerate launch`` on 8 GPUs (FSDP or DeepSpeed, chosen by the accelerate config file, not here), or
as several CPU processes over gloo (the test of the distributed path). Every distributed detail is left
to ``Trainer`` and accelerate; this module only turns a :class:`TrainConfig` into ``TrainingArguments``,
keeps the global batch fixed whatever the number of processes, and saves the final model without
gathering it on the GPUs (stanford_alpaca#65).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import sys
import time
import types
import typing
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import PrinterCallback, SchedulerType, Trainer, TrainerCallback, TrainingArguments
from transformers.utils.import_utils import is_in_notebook

from alpaca_nb.data import AlpacaRecord, load_alpaca_data
from alpaca_nb.jsonl import write_text_atomically
from alpaca_nb.models import load_model, quiet_hf_progress, record_prompt_template
from alpaca_nb.progress import progress_bar
from alpaca_nb.batching import AlpacaCollator, enable_packed_attention, padding_free_collator
from alpaca_nb.sft import DataMix, SFTReport, build_dataset, ensure_pad_token, export_stanford_json, mix_records

__all__ = [
    "LOSS_CURVE_FILE", "BookData", "TrainConfig", "TrainConfigError", "TrainResult", "book_training_data",
    "fsdp_units", "gradient_accumulation_steps", "last_checkpoint", "laptop_config", "load_result", "main", "peft_available", "plot_loss_curve",
    "profile_config", "read_book_data", "train", "training_arguments", "training_records", "upstream_config", "world_size",
]

logger = logging.getLogger("alpaca_nb.train")  # the same name under `python -m`

LOSS_CURVE_FILE = "loss_curve.json"
FINAL_DIR = "final"
TRAINING_DATA_FILE = "training_data.json"  # the Stanford JSON a profile's fine-tune trains on ...
MIX_FILE = "mix.json"  # ... and how it was mixed (book_training_data, read_book_data)
LORA_LEARNING_RATE = 3e-4  # alpaca-lora's (tloen/alpaca-lora finetune.py), with r=8, alpha=16, q_proj/v_proj
LAPTOP_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class TrainConfigError(ValueError):
    """A training configuration that cannot run as asked; the message names the setting and the fix."""


@dataclass
class TrainConfig:
    """Everything one fine-tuning run needs; ``upstream_config`` and ``laptop_config`` fill it in."""

    output_dir: str
    model: str | None = None                  # None = the embedded SmolLM2-135M-Instruct; else an HF id or path
    model_dtype: str = "float32"              # "bfloat16" halves the memory of a frozen LoRA base; full fine-tunes
                                              # keep float32 master weights, as upstream (bf16 is the autocast)
    data: str = "alpaca_sample"               # a data.ASSETS name, or the path of a stanford-format JSON file
    n_examples: int | None = None             # the first N records; None = all
    n_eval_examples: int = 0                  # held out from the END of the data: loss measured before and after
    epochs: float = 3.0
    learning_rate: float = 2e-5
    global_batch_size: int = 128              # examples per optimizer step, summed over processes and accumulation
    per_device_batch_size: int = 4
    max_length: int = 512
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    bf16: bool = True                         # bf16 autocast (mixed precision); the weights stay float32
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    padding_free: bool = False                # pack each micro-batch into one row (DataCollatorWithFlattening)
    train_on_input: bool = False
    activation_checkpointing: bool = False    # under FSDP, prefer fsdp_activation_checkpointing in the yaml
    seed: int = 42
    max_steps: int | None = None              # overrides epochs when set
    stop_after_steps: int | None = None       # simulate a killed job: checkpoint and stop here, schedule unchanged
    save_steps: int = 200
    save_total_limit: int | None = 2
    logging_steps: int = 1
    resume: bool = False                      # continue from the last checkpoint-N in output_dir
    save_final_model: bool = True             # write output_dir/final, loadable with load_model()


@dataclass
class TrainResult:
    """What a run produced: its loss curve, where it saved, how long it took and what data it saw."""

    final_loss: float | None
    loss_curve: list[tuple[int, float]]
    output_dir: str
    final_model_dir: str | None
    elapsed_seconds: float
    global_step: int
    world_size: int
    gradient_accumulation_steps: int
    lora: bool
    interrupted: bool
    data_report: SFTReport = field(repr=False)
    eval_loss_before: float | None = None     # on the held-out examples, before the first step (None: no eval)
    eval_loss_after: float | None = None
    trainable_parameters: int = 0             # what the optimizer updates: all of them, or LoRA's adapters
    total_parameters: int = 0


# --------------------------------------------------------------------------- presets


def peft_available() -> bool:
    """Return True when the ``peft`` package (LoRA) is installed."""
    return importlib.util.find_spec("peft") is not None


def upstream_config(model_name: str | None, output_dir: str) -> TrainConfig:
    """Return stanford_alpaca's recipe: full fine-tune, 3 epochs, lr 2e-5, global batch 128, cosine, bf16, 512 tokens.

    The global batch stays 128 on any number of GPUs: gradient accumulation is derived from the world size.
    One departure: upstream's save_steps=2000 exceeds the 1,221 steps of the run, so a killed job restarted from
    zero; here a checkpoint is written every 200 steps and the last two are kept. The Trainer rounds up twice:
    each epoch is ceil(52,002 / 128) = 407 optimizer steps (the last one on a partial batch; per process,
    ceil(batches / accumulation)), and 3 epochs are 1,221 steps, not 52,002 × 3 / 128 = 1,218.8 (transformers
    5.24 Trainer.set_initial_training_values). It stays 407 per epoch while more than 51,968 examples are kept.
    """
    return TrainConfig(
        output_dir=output_dir, model=model_name, data="alpaca_data", epochs=3.0, learning_rate=2e-5,
        global_batch_size=128, per_device_batch_size=4, max_length=512, lr_scheduler="cosine", warmup_ratio=0.03,
        weight_decay=0.0, bf16=True, lora=False, save_steps=200, save_total_limit=2, logging_steps=1,
    )


def laptop_config(output_dir: str, lora: bool | None = None) -> TrainConfig:
    """Return the CPU preset: the embedded model, 3 epochs (Alpaca's) of LoRA on every linear layer, minutes.

    LoRA r=16, alpha=32, dropout 0.05 on all seven projections, lr 3e-4, when peft is installed: about twice as
    fast per step as a full fine-tune on CPU, with a checkpoint of megabytes. alpaca-lora's r=8 on q_proj/v_proj
    (the TrainConfig default) is too weak for minutes of CPU: 15 such steps on the 68 real records left the
    share of held-out greedy replies that end with EOS within 128 tokens at 17 of 32, as before the fine-tune;
    36 steps of this preset on chapter 4's mix gave 26 to 31 of 32 over five runs (2-core CPU, December 2026);
    global batch 8, lr 1e-3 or 5 epochs did not raise it (28 to 31 on three mixes). Within chapter 4's cap (the
    longest held-out answer and its EOS: 236 tokens) nine such fine-tunes ended 29 to 32. Without peft it falls
    back to a full fine-tune at lr 5e-5 (``lora=False`` forces it). Padding-free batches: packing computes no
    padding and gives the same loss.
    Data and held-out size are the laptop profile's (``finetune_asset``, ``finetune_eval_examples`` in
    profiles.toml: the one place they are set); chapter 4 passes its own mix.
    """
    from alpaca_nb.profiles import load_profile

    laptop = load_profile("laptop")
    use_lora = peft_available() if lora is None else lora
    return TrainConfig(
        output_dir=output_dir, model=laptop.base_model, data=laptop.finetune_asset, n_examples=None, epochs=3.0,
        learning_rate=LORA_LEARNING_RATE if use_lora else 5e-5, global_batch_size=16, per_device_batch_size=4,
        max_length=512, lr_scheduler="cosine", warmup_ratio=0.03, weight_decay=0.0, bf16=True, lora=use_lora,
        lora_r=16, lora_alpha=32, lora_target_modules=LAPTOP_LORA_TARGETS,
        n_eval_examples=laptop.finetune_eval_examples, padding_free=True, save_steps=12, save_total_limit=2,
        logging_steps=1,
    )


@dataclass(frozen=True)
class BookData:
    """Chapter 4's training file: the data mix, then the held-out real records the run measures."""

    mix: DataMix
    held_out: tuple[AlpacaRecord, ...]
    path: Path  # Stanford JSON; TrainConfig holds out len(held_out) records from its end


def book_training_data(profile, generated: Sequence[Any], folder: str | os.PathLike) -> BookData:
    """Return chapter 4's data: ``generated`` (chapter 2's kept records) topped up with real ones from the
    profile's ``finetune_asset`` to ``finetune_examples``; the file's last ``finetune_eval_examples`` real
    records are held out and never mixed in."""
    real = load_alpaca_data(asset=profile.finetune_asset)
    if profile.finetune_eval_examples >= len(real):
        raise TrainConfigError(f"{profile.finetune_asset} has {len(real)} records: finetune_eval_examples="
                               f"{profile.finetune_eval_examples} would hold out all of them")
    split = len(real) - profile.finetune_eval_examples
    mix = mix_records(generated, real[:split], profile.finetune_examples, profile.finetune_asset)
    held_out = tuple(real[split:])
    path = export_stanford_json([*mix.records, *held_out], Path(folder) / TRAINING_DATA_FILE)
    write_text_atomically(Path(folder) / MIX_FILE, json.dumps({
        "summary": mix.summary(), "generated": mix.generated, "real": mix.real, "real_source": mix.real_source,
        "empty_outputs": mix.empty_outputs, "looping_outputs": mix.looping_outputs, "held_out": len(held_out)},
        indent=1) + "\n")
    return BookData(mix, held_out, path)


def read_book_data(folder: str | os.PathLike) -> BookData:
    """Return the data ``book_training_data`` wrote to ``folder`` (the recipe's ``sft_data`` stage)."""
    from alpaca_nb.data import DataError

    path, mix_path = Path(folder) / TRAINING_DATA_FILE, Path(folder) / MIX_FILE
    try:
        mix = json.loads(mix_path.read_text(encoding="utf-8"))
        records = load_alpaca_data(path)
        mixed = mix["generated"] + mix["real"]
        if mixed + mix["held_out"] != len(records):
            raise DataError(f"{path}: {len(records)} records, {mix_path} says {mixed} mixed + {mix['held_out']} held out")
        return BookData(DataMix(tuple(records[:mixed]), mix["generated"], mix["real"], mix["real_source"],
                                mix["empty_outputs"], mix["looping_outputs"]), tuple(records[mixed:]), path)
    except (OSError, json.JSONDecodeError, KeyError) as error:
        raise DataError(f"{folder}: not a finished training-data folder ({type(error).__name__}: {error})") from None


def profile_config(profile, output_dir: str, data: BookData | None = None) -> TrainConfig:
    """Return chapter 4's run for a profile: the laptop preset on its model, data and sizes (LoRA).

    ``data`` (``book_training_data``) trains on its mix and holds out its real records; without it, the
    first ``finetune_examples`` of the profile's ``finetune_asset``. On the cluster profile that is a one-GPU
    LoRA run of the profile's base model (weights in bf16), minutes inside the notebook; the full recipe is
    ``upstream_config`` under ``accelerate launch`` (book/appendix_cluster.md).
    """
    config = laptop_config(output_dir)
    config = replace(
        config, model=profile.base_model, data=profile.finetune_asset, n_examples=profile.finetune_examples,
        n_eval_examples=profile.finetune_eval_examples, max_steps=profile.finetune_max_steps,
        model_dtype=half_precision_dtype() if config.lora and torch.cuda.is_available() else "float32",
    )
    if data is not None:
        config = replace(config, data=str(data.path), n_examples=None, n_eval_examples=len(data.held_out))
    return config


# --------------------------------------------------------------------------- the global batch


def world_size() -> int:
    """Return the number of training processes the launcher started (``WORLD_SIZE``; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def gradient_accumulation_steps(global_batch_size: int, per_device_batch_size: int, processes: int) -> int:
    """Return the accumulation steps that make ``processes × per_device × steps`` equal the global batch.

    Upstream fixed per-device batch 4 and accumulation 8 for 4 GPUs: on 8 GPUs the same command doubled
    the batch to 256. Deriving the accumulation keeps the recipe's 128 on any cluster.
    """
    for name, value in (("global_batch_size", global_batch_size), ("per_device_batch_size", per_device_batch_size),
                        ("world size", processes)):
        if value < 1:
            raise TrainConfigError(f"{name} must be at least 1, got {value}")
    per_micro_step = per_device_batch_size * processes
    if global_batch_size % per_micro_step:
        raise TrainConfigError(
            f"global_batch_size={global_batch_size} is not divisible by per_device_batch_size={per_device_batch_size} "
            f"× {processes} process(es) = {per_micro_step}: no whole number of accumulation steps gives that batch. "
            f"Change --per-device-batch-size or the number of processes, or choose a global batch that is a "
            f"multiple of {per_micro_step}.")
    return global_batch_size // per_micro_step


# --------------------------------------------------------------------------- TrainingArguments


def training_arguments(config: TrainConfig, processes: int | None = None) -> TrainingArguments:
    """Return the ``TrainingArguments`` for ``config`` on ``processes`` processes (default: the launcher's)."""
    processes = world_size() if processes is None else processes
    accumulation = gradient_accumulation_steps(config.global_batch_size, config.per_device_batch_size, processes)
    args = TrainingArguments(
        output_dir=config.output_dir,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps if config.max_steps is not None else -1,
        per_device_train_batch_size=config.per_device_batch_size,
        per_device_eval_batch_size=config.per_device_batch_size,
        prediction_loss_only=True,                # evaluation needs the loss only, not every logit kept
        gradient_accumulation_steps=accumulation,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,          # transformers 5: a float in [0, 1) is a ratio of the total steps
        weight_decay=config.weight_decay,
        bf16=uses_bf16(config),
        fp16=uses_fp16(config),                    # pre-Ampere GPUs; it overrides the accelerate yaml's bf16 too
        # On a machine without CUDA, say so: otherwise accelerate sees no device, treats each process as
        # a lone run, and a 2-process launch trains two independent copies (checked in train()).
        use_cpu=not torch.cuda.is_available(),
        tf32=_ampere_or_newer() or None,           # upstream ran with --tf32 True on A100s
        activation_checkpointing=config.activation_checkpointing or None,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        data_seed=config.seed,
        remove_unused_columns=False,              # the examples are plain dicts of input_ids/labels
        ddp_find_unused_parameters=False,         # every trainable parameter takes part in each forward pass
        report_to="none",
        # Trainer's own bars print every log dict beside the bar (and a live table in a notebook): train()
        # puts one quiet bar in their place where someone watches, and keeps logged lines in a batch job.
        disable_tqdm=True,
    )
    if processes == 1 and args.n_gpu > 1:
        # One process that sees several GPUs (a notebook on a multi-GPU node): Trainer wraps the model in
        # nn.DataParallel and feeds per-device batch × GPUs per micro-step; keep the global batch anyway.
        args.gradient_accumulation_steps = gradient_accumulation_steps(
            config.global_batch_size, config.per_device_batch_size, args.n_gpu)
    return args


def bf16_is_fast() -> bool:
    """Return True when this machine computes in bfloat16 natively: a CUDA GPU that supports it, or a CPU with
    AVX512-BF16 or AMX. Elsewhere (an AVX2-only CPU) torch emulates bf16 matmuls, and autocast made a training
    step about 19 times slower than float32 (AMD EPYC, AVX2 only, December 2026): such runs keep float32."""
    if torch.cuda.is_available():
        # including_emulation=False: otherwise torch says yes on a V100 or T4 too (compute capability 7.x, before
        # Ampere), which has no bf16 tensor cores, and transformers would accept bf16=True there.
        return torch.cuda.is_bf16_supported(including_emulation=False)
    native = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in native)


def uses_bf16(config: TrainConfig) -> bool:
    """Return True when a run of ``config`` computes in bf16 autocast: asked for, and fast on this machine."""
    return config.bf16 and bf16_is_fast()


def uses_fp16(config: TrainConfig) -> bool:
    """Return True when a run of ``config`` computes in fp16 autocast instead: bf16 was asked for on a CUDA GPU
    without it (V100, T4: before Ampere). The weights stay float32 and the Trainer scales the loss so that small
    fp16 gradients do not underflow; on a CPU without native bf16 the run keeps float32 (``uses_bf16``)."""
    return config.bf16 and torch.cuda.is_available() and not bf16_is_fast()


def half_precision_dtype() -> str:
    """Return the 16-bit dtype for frozen weights (a LoRA base) on this GPU: bfloat16, or float16 before Ampere."""
    return "bfloat16" if bf16_is_fast() else "float16"


def _ampere_or_newer() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


class _ProgressBar(TrainerCallback):
    """One tqdm.auto bar over the optimizer steps, the last training loss beside it; nothing else printed."""

    def __init__(self):
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = progress_bar(total=state.max_steps, initial=state.global_step, desc="fine-tuning",
                                    unit="step")

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{float(logs['loss']):.3f}", refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _watched() -> bool:
    """Return True at a terminal or in a notebook, where a progress bar beats a log line per step."""
    return sys.stderr.isatty() or is_in_notebook()


class _StopAfterSteps(TrainerCallback):
    """Checkpoint and stop at a given step without changing the planned schedule (a job killed there)."""

    def __init__(self, step: int):
        self.step = step
        self.stopped = False

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_save = True
            control.should_training_stop = True
            self.stopped = True
        return control


def fsdp_units(model: torch.nn.Module) -> dict[str, int]:
    """Return {class name: count} of the modules FSDP gathers and frees as one unit (FSDP2 or FSDP1)."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, FullyShardedDataParallel):
            name = type(module.module).__name__
        elif isinstance(module, FSDPModule):
            name = type(module).__name__.removeprefix("FSDP")  # fully_shard swaps in a class FSDP<Name>
        else:
            continue
        counts[name] = counts.get(name, 0) + 1
    return counts


class _ReportFsdpUnits(TrainerCallback):
    """Log, once the model is sharded, which layers FSDP wraps: the check upstream's #58 needed."""

    def __init__(self):
        self.reported = False

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.reported or model is None or not state.is_world_process_zero:
            return
        self.reported = True
        units = fsdp_units(model)
        layers = {name: count for name, count in units.items() if count > 1}
        if layers:
            logger.info("FSDP units: %s", ", ".join(f"{count} × {name}" for name, count in units.items()))
        else:
            # stanford_alpaca#58: a class name that matches nothing leaves one unit, the whole model,
            # gathered at every step: correct results, several times slower and far more memory.
            logger.warning("FSDP wraps no repeated layer (%s): each step gathers the whole model; check "
                           "fsdp_transformer_layer_cls_to_wrap", units or "nothing")


# --------------------------------------------------------------------------- the run


def training_records(config: TrainConfig) -> tuple[list, list]:
    """Return (training records, held-out records): up to ``n_examples`` from the start, ``n_eval_examples`` from the end."""
    as_path = Path(config.data).expanduser()
    if as_path.suffix == ".json" or as_path.is_file():
        records = load_alpaca_data(as_path)
    else:
        records = load_alpaca_data(asset=config.data)
    if config.n_eval_examples >= len(records):
        raise TrainConfigError(f"{config.data!r} has {len(records)} records: holding out n_eval_examples="
                               f"{config.n_eval_examples} would leave none to train on (--eval-examples)")
    held_out = records[len(records) - config.n_eval_examples:] if config.n_eval_examples > 0 else []
    training = records[:len(records) - len(held_out)]  # never overlaps the held-out records
    return (training if config.n_examples is None else training[:config.n_examples]), held_out


def _dtype(name: str) -> torch.dtype:
    if name not in ("float32", "bfloat16", "float16"):
        raise TrainConfigError(f"model_dtype={name!r}: choose float32, bfloat16 or float16")
    return getattr(torch, name)


def _with_lora(model, config: TrainConfig):
    if not peft_available():
        raise TrainConfigError("lora=True needs the peft package: `pip install peft`, or train with --no-lora")
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(task_type="CAUSAL_LM", r=config.lora_r, lora_alpha=config.lora_alpha,
                      lora_dropout=config.lora_dropout, target_modules=list(config.lora_target_modules))
    with warnings.catch_warnings():
        # peft 0.21 reads `is_gradient_checkpointing`, which transformers 5 deprecates: not ours to fix.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        model = get_peft_model(model, lora)
    if config.activation_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings would otherwise cut the recomputed graph
    return model


CHECKPOINT_STATE_FILE = "trainer_state.json"  # transformers.trainer_utils.TRAINER_STATE_NAME


def last_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """Return the newest complete ``checkpoint-N`` folder in ``output_dir`` (what ``resume=True`` continues
    from), or None.

    Complete means its ``trainer_state.json`` parses and names step N. Trainer._save_checkpoint writes that file
    last, after the model shards, optimizer, scheduler and RNG states (transformers 5.24 trainer.py:3377-3417),
    and only then deletes older checkpoints; so a folder without it was cut off mid-save (a job preempted
    while saving). transformers' own ``get_last_checkpoint`` goes by N alone and would pick it, and
    ``Trainer.train`` then stops on the missing state file (trainer.py:1565) at every requeue.
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    numbered = []
    for path in folder.iterdir():
        prefix, _, step = path.name.partition("-")
        if prefix == "checkpoint" and step.isdecimal() and path.is_dir():
            numbered.append((int(step), path))
    for step, path in sorted(numbered, reverse=True):
        try:
            state = json.loads((path / CHECKPOINT_STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            state = None
        if isinstance(state, dict) and state.get("global_step") == step:
            return str(path)
        logger.warning("%s: skipped, its %s is missing or incomplete (the save was cut off)",
                       path, CHECKPOINT_STATE_FILE)
    return None


def _eval_loss_at_start(trainer: Trainer) -> float | None:
    """Return the held-out loss logged at step 0 (eval_on_start), None when this run's history has none."""
    return next((float(entry["eval_loss"]) for entry in trainer.state.log_history
                 if "eval_loss" in entry and entry.get("step") == 0), None)


def _loss_curve(trainer: Trainer) -> list[tuple[int, float]]:
    return [(int(entry["step"]), float(entry["loss"])) for entry in trainer.state.log_history if "loss" in entry]


def _save_final(trainer: Trainer, tokenizer, config: TrainConfig, use_cache: bool) -> str:
    """Save a model folder that ``load_model(path)`` opens, gathering sharded weights on the CPU of rank 0.

    FSDP: checkpoints during training are SHARDED_STATE_DICT (each rank writes its own shard, nothing is
    gathered). Only here do we switch to FULL_STATE_DICT, which in accelerate 1.15 gathers one parameter at a
    time with ``cpu_offload=True`` into rank 0's CPU memory (FSDP1: FullStateDictConfig(offload_to_cpu=True,
    rank0_only=True)). Upstream called ``trainer.model.state_dict()`` on every rank and gathered the whole
    7B model onto each GPU at once, which ran out of memory (stanford_alpaca#65). DeepSpeed ZeRO-3
    consolidates a 16-bit copy on rank 0 when the config sets ``zero3_save_16bit_model: true``.
    """
    final_dir = str(Path(config.output_dir) / FINAL_DIR)
    model = trainer.model
    model.config.use_cache = use_cache  # training ran without the KV cache; generation wants it back
    if trainer.is_fsdp_enabled:
        plugin = trainer.accelerator.state.fsdp_plugin
        plugin.state_dict_config = plugin.optim_state_dict_config = None  # rebuilt for FULL: offload, rank 0 only
        plugin.set_state_dict_type("FULL_STATE_DICT")
    distributed_weights = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    if config.lora and not distributed_weights:
        # Merge the adapter into the base weights so the folder loads like any model (chapter 5 compares it).
        if trainer.is_world_process_zero():
            trainer.accelerator.unwrap_model(model).merge_and_unload().save_pretrained(final_dir)
            tokenizer.save_pretrained(final_dir)
        trainer.accelerator.wait_for_everyone()
    else:
        trainer.save_model(final_dir)  # a LoRA run under FSDP/DeepSpeed gathers and saves the adapter only
        if config.lora:
            if trainer.is_world_process_zero():
                _merge_saved_adapter(final_dir, config)
            trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        record_prompt_template(final_dir, "alpaca")  # `alpaca-nb reply` prompts it as it was trained
    return final_dir


@contextlib.contextmanager
def loading_whole_weights():
    """Within it, ``from_pretrained`` loads whole weights even while a DeepSpeed ZeRO-3 run is on.

    TrainingArguments registers its stage-3 config with transformers (a weak reference), and every
    ``from_pretrained`` then loads inside ``deepspeed.zero.Init``, which partitions with collectives over all
    ranks. accelerate 1.15's ``zero3_init_context_manager(enable=False)`` re-registers the same config
    (DeepSpeedPlugin.set_deepspeed_weakref), so the registration itself is set aside here and put back after.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    reference = hf_deepspeed._hf_deepspeed_config_weak_ref
    registered = reference() if reference is not None else None
    if registered is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(registered)


ADAPTER_DIR = "adapter"  # final/adapter: the LoRA weights a distributed run saved, kept beside the merged model


def _merge_saved_adapter(final_dir: str, config: TrainConfig) -> None:
    """Turn the adapter-only folder an FSDP/DeepSpeed LoRA run saved into a merged model folder (rank 0, CPU).

    Under FSDP or DeepSpeed the adapter's weights are sharded across ranks, so the in-memory merge of a one-process
    run is not possible; ``Trainer.save_model`` gathers them and writes ``adapter_config.json`` and
    ``adapter_model.safetensors`` only, which ``load_model`` and ``load_result`` cannot open. Here the base
    model is loaded again on the CPU, given the same ``[PAD]`` row as train() gave it (the mean of the rows
    before: deterministic, and frozen during LoRA), the adapter applied and merged. The adapter files move to
    ``final/adapter/``: left at the top, transformers would read the folder as an adapter on a base model.
    """
    from peft import PeftModel

    folder = Path(final_dir)
    adapter = folder / ADAPTER_DIR
    adapter.mkdir(exist_ok=True)
    for path in folder.iterdir():
        if path.is_file() and path.name.startswith("adapter_"):
            path.replace(adapter / path.name)
    with loading_whole_weights():  # rank 0 alone: a ZeRO-3 load here would wait for the other ranks forever
        base, base_tokenizer = load_model(config.model, dtype=_dtype(config.model_dtype))
    ensure_pad_token(base, base_tokenizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.save_pretrained(final_dir)


def train(config: TrainConfig) -> TrainResult:
    """Return the result of fine-tuning ``config.model`` on ``config.data`` with Trainer (chapter 4).

    Writes ``output_dir/loss_curve.json`` (rank 0), a ``checkpoint-N`` every ``save_steps`` and, unless
    interrupted, ``output_dir/final``. ``resume=True`` continues from the last checkpoint in ``output_dir``
    with the same data order, optimizer and scheduler state.
    """
    processes = world_size()
    args = training_arguments(config, processes)
    if args.world_size != processes:
        raise TrainConfigError(
            f"the launcher started {processes} processes (WORLD_SIZE) but the Trainer sees {args.world_size}: "
            "on a machine without GPUs use an accelerate config with `use_cpu: true` "
            "(configs/accelerate/cpu_2proc.yaml), otherwise each process would train its own copy")
    resume_from = None
    if config.resume:
        resume_from = last_checkpoint(config.output_dir)
        if resume_from is None:
            raise TrainConfigError(f"resume=True but {config.output_dir} holds no checkpoint-N folder to resume from")

    model, tokenizer = load_model(config.model, dtype=_dtype(config.model_dtype))
    ensure_pad_token(model, tokenizer)
    use_cache = bool(getattr(model.config, "use_cache", True))
    # No KV cache while training; required for padding-free packing, where a cache object makes
    # transformers 5.23 skip the packed-sequence mask and examples attend to one another.
    model.config.use_cache = False
    if config.padding_free and not str(model.config._attn_implementation).startswith("flash"):
        # Stock SDPA attends over the whole packed row (cost ~ row length squared) and lets examples see
        # each other whenever a cache appears; flash-attention's varlen kernel already splits the row.
        enable_packed_attention(model)
    if config.lora:
        model = _with_lora(model, config)
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    total = sum(parameter.numel() for parameter in model.parameters())

    records, held_out = training_records(config)
    examples, report = build_dataset(records, tokenizer, max_length=config.max_length,
                                     train_on_input=config.train_on_input)
    if not examples:
        raise TrainConfigError(f"no training example left from {config.data!r}: {report.summary()}")
    eval_examples = build_dataset(held_out, tokenizer, max_length=config.max_length)[0] if held_out else None
    collator = padding_free_collator() if config.padding_free else AlpacaCollator(tokenizer)

    stopper = _StopAfterSteps(config.stop_after_steps) if config.stop_after_steps else None
    trainer = Trainer(model=model, args=args, train_dataset=examples, eval_dataset=eval_examples,
                      data_collator=collator, processing_class=tokenizer, callbacks=[stopper] if stopper else None)
    if _watched():
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(_ProgressBar())
    if trainer.is_fsdp_enabled:
        trainer.add_callback(_ReportFsdpUnits())
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not trainer.is_fsdp_enabled:
        # accelerate 1.15 enables FSDP only for GPU-like device types: on CPU it keeps MULTI_CPU (DDP over
        # gloo) and drops the FSDP plugin without a word. Say so, rather than let a log claim sharding.
        logger.warning("the accelerate config asks for FSDP but accelerate runs %s: on CPU it does not shard; "
                       "training proceeds as plain data parallelism", trainer.accelerator.distributed_type)
    if trainer.is_world_process_zero():
        logger.info("%s; %d process(es) × %d per device × %d accumulation = global batch %d; %s",
                    report.summary(), processes, config.per_device_batch_size, args.gradient_accumulation_steps,
                    config.global_batch_size, "LoRA" if config.lora else "full fine-tune")

    # The held-out loss is what the training loss cannot show: whether the model got better on examples it
    # never saw. The loss per step moves with each batch's mix of examples; this one does not.
    # "Before" is measured inside train(), after accelerate has prepared the model and optimizer together
    # (eval_on_start), not by trainer.evaluate() beforehand: under FSDP2 that call prepares the model alone
    # and accelerate 1.15 refuses ("a model and optimizer must be passed together", accelerator.py:1519;
    # transformers#48841). A resumed run finds the first attempt's step-0 value in the restored log history
    # rather than measuring the checkpoint and calling it "before".
    args.eval_on_start = eval_examples is not None and resume_from is None
    started = time.perf_counter()
    with quiet_hf_progress():  # a "Writing model shards" bar at every checkpoint
        trainer.train(resume_from_checkpoint=resume_from)
    elapsed = time.perf_counter() - started
    interrupted = bool(stopper and stopper.stopped)
    eval_before = _eval_loss_at_start(trainer) if eval_examples else None
    eval_after = trainer.evaluate()["eval_loss"] if eval_examples and not interrupted else None
    final_dir = None
    if config.save_final_model and not interrupted:
        with quiet_hf_progress():
            final_dir = _save_final(trainer, tokenizer, config, use_cache)

    curve = _loss_curve(trainer)
    result = TrainResult(
        final_loss=curve[-1][1] if curve else None, loss_curve=curve, output_dir=config.output_dir,
        final_model_dir=final_dir, elapsed_seconds=elapsed, global_step=trainer.state.global_step,
        world_size=processes, gradient_accumulation_steps=args.gradient_accumulation_steps, lora=config.lora,
        interrupted=interrupted, data_report=report, eval_loss_before=eval_before, eval_loss_after=eval_after,
        trainable_parameters=trainable, total_parameters=total,
    )
    if trainer.is_world_process_zero():
        _write_loss_curve(result, config)
    return result


def _write_loss_curve(result: TrainResult, config: TrainConfig) -> Path:
    path = Path(config.output_dir) / LOSS_CURVE_FILE
    report = {key: value for key, value in asdict(result.data_report).items() if not key.endswith("_indices")}
    payload = {
        "loss_curve": [[step, loss] for step, loss in result.loss_curve],
        "final_loss": result.final_loss,
        "global_step": result.global_step,
        "elapsed_seconds": round(result.elapsed_seconds, 3),
        "world_size": result.world_size,
        "gradient_accumulation_steps": result.gradient_accumulation_steps,
        "interrupted": result.interrupted,
        "eval_loss_before": result.eval_loss_before,
        "eval_loss_after": result.eval_loss_after,
        "trainable_parameters": result.trainable_parameters,
        "total_parameters": result.total_parameters,
        "data_report": report,
        "config": asdict(config),
    }
    return write_text_atomically(path, json.dumps(payload, indent=1) + "\n")


def load_result(output_dir: str | os.PathLike) -> TrainResult:
    """Return the result of a finished run in ``output_dir``, as its ``loss_curve.json`` records it.

    A run that was interrupted before it wrote the file, or whose ``final/`` model is missing, raises DataError
    saying so (rerun with ``--resume``), never a half-read result.
    """
    from alpaca_nb.data import DataError

    path = Path(output_dir) / LOSS_CURVE_FILE
    if not path.is_file():
        raise DataError(f"{path}: no such file: the run did not finish (rerun it with --resume)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        final = Path(output_dir) / FINAL_DIR
        result = TrainResult(
            final_loss=raw["final_loss"], loss_curve=[(int(step), float(loss)) for step, loss in raw["loss_curve"]],
            output_dir=str(output_dir), final_model_dir=str(final) if (final / "config.json").is_file() else None,
            elapsed_seconds=raw["elapsed_seconds"], global_step=raw["global_step"], world_size=raw["world_size"],
            gradient_accumulation_steps=raw["gradient_accumulation_steps"], lora=raw["config"]["lora"],
            interrupted=raw["interrupted"], data_report=SFTReport(**raw["data_report"]),
            eval_loss_before=raw["eval_loss_before"], eval_loss_after=raw["eval_loss_after"],
            trainable_parameters=raw["trainable_parameters"], total_parameters=raw["total_parameters"])
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise DataError(f"{path}: not a loss_curve.json of this version ({type(error).__name__}: {error})") from None
    if result.final_model_dir is None and not result.interrupted:
        raise DataError(f"{final}: no model: the run stopped before saving it (rerun it with --resume)")
    return result


def plot_loss_curve(result: TrainResult):
    """Return a plot of the training loss per optimizer step, with the held-out loss before and after (chapter 4)."""
    import matplotlib.pyplot as plt

    steps, losses = zip(*result.loss_curve) if result.loss_curve else ((), ())
    figure, axis = plt.subplots(figsize=(7, 3.4), constrained_layout=True)
    axis.plot(steps, losses, marker="o", markersize=3, label="training loss (each step's batch)")
    if result.eval_loss_before is not None and result.eval_loss_after is not None:
        axis.plot([0, result.global_step], [result.eval_loss_before, result.eval_loss_after], marker="s",
                  linestyle="--", color="#d95f02", label=f"held-out loss ({result.eval_loss_before:.3f} -> "
                                                           f"{result.eval_loss_after:.3f})")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("cross-entropy on response tokens")
    axis.set_title(f"{'LoRA' if result.lora else 'full'} fine-tune, {result.world_size} process(es)")
    axis.legend(fontsize=8)
    return figure


# --------------------------------------------------------------------------- command line


# Option names the book, README and configs already use for two fields; every other field is --field-name.
_OPTION_NAMES = {"n_examples": "--examples", "n_eval_examples": "--eval-examples"}
_OPTION_HELP = {
    "model": "Hugging Face id or local folder (default: the profile's base_model; the embedded "
             "SmolLM2-135M-Instruct on a laptop)",
    "data": "a data asset name (alpaca_data, alpaca_sample, alpaca_gpt4_demo) or a stanford-format JSON file",
    "model_dtype": "dtype of the loaded weights (bfloat16 for a LoRA base on one GPU)",
    "n_examples": "train on the first N records",
    "n_eval_examples": "hold out the last N records and report their loss before and after training",
    "stop_after_steps": "checkpoint and stop at this step, as a killed job would (then --resume)",
    "resume": "continue from the last checkpoint in --output-dir",
}
_OPTION_CHOICES = {"model_dtype": ("float32", "bfloat16", "float16"),
                   "lr_scheduler": tuple(scheduler.value for scheduler in SchedulerType)}


def _parser() -> argparse.ArgumentParser:
    """Return the command line: --preset, then one option per TrainConfig field, derived from the dataclass so
    that none is missed; an option not given keeps the preset's value."""
    parser = argparse.ArgumentParser(
        prog="python -m alpaca_nb.train",
        description="Fine-tune on Alpaca data with transformers' Trainer (book chapter 4). Launch it with "
                    "`accelerate launch --config_file configs/accelerate/... -m alpaca_nb.train` for several "
                    "GPUs or processes. Options not given keep the preset's values.")
    parser.add_argument("--preset", choices=("laptop", "upstream"), default=None,
                        help="laptop: embedded model, CPU, minutes; upstream: the stanford_alpaca recipe "
                             "(default: upstream when ALPACA_NB_PROFILE=cluster, else laptop)")
    hints = typing.get_type_hints(TrainConfig)
    for config_field in fields(TrainConfig):
        name = config_field.name
        option = _OPTION_NAMES.get(name, "--" + name.replace("_", "-"))
        kind = hints[name]
        if isinstance(kind, types.UnionType):  # X | None: the option takes an X
            kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        options: dict[str, Any] = {"dest": name, "help": _OPTION_HELP.get(name)}
        if name == "output_dir":
            options["required"] = True
        elif name == "resume":
            options.update(action="store_true")
        elif kind is bool:
            options.update(action=argparse.BooleanOptionalAction, default=None)
        elif typing.get_origin(kind) is tuple:
            options.update(nargs="+", default=None)
        else:
            options.update(type=kind, default=None, choices=_OPTION_CHOICES.get(name))
        parser.add_argument(option, **options)
    return parser


def config_from_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Return the TrainConfig the command line asks for: a preset with the given options laid over it."""
    from alpaca_nb.profiles import current_profile

    options = vars(_parser().parse_args(argv))
    profile = current_profile()
    preset = options.pop("preset") or ("upstream" if profile.name == "cluster" else "laptop")
    model = options.pop("model")
    model = model if model is not None else profile.base_model
    output_dir, lora = options.pop("output_dir"), options["lora"]
    if preset == "upstream":
        config = upstream_config(model, output_dir)
    else:
        config = replace(laptop_config(output_dir, lora=lora), model=model)
    overrides = {name: tuple(value) if isinstance(value, list) else value for name, value in options.items()
                 if value is not None}
    if lora and lora != config.lora and options["learning_rate"] is None:
        overrides["learning_rate"] = LORA_LEARNING_RATE  # 2e-5 barely moves a rank-8 adapter
    return replace(config, **overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m alpaca_nb.train``; print the loss curve's end and where the model went (rank 0)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)  # this module's own lines (data kept, batch arithmetic, FSDP units)
    config = config_from_args(argv)
    try:
        result = train(config)
    except TrainConfigError as error:
        print(f"python -m alpaca_nb.train: {error}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        held_out = (f"held-out loss {result.eval_loss_before:.4f} -> {result.eval_loss_after:.4f}; "
                    if result.eval_loss_before is not None and result.eval_loss_after is not None else "")
        saved = (f"; model {result.final_model_dir}" if result.final_model_dir
                 else "; interrupted, no final model" if result.interrupted else "")
        print(f"{result.global_step} steps in {result.elapsed_seconds:.1f} s on {result.world_size} process(es) "
              f"(accumulation {result.gradient_accumulation_steps}); final loss {result.final_loss}; {held_out}"
              f"loss curve {Path(config.output_dir) / LOSS_CURVE_FILE}{saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

