"""A fine-tune's settings: :class:`TrainConfig`, the upstream recipe and the laptop preset, a profile's run, the
``TrainingArguments`` they become (global batch kept fixed whatever the number of processes; bf16/fp16 by what the
GPU does fast) and ``python -m alpaca_nb.train``'s command line. Taught in chapter 4; ``train`` runs them.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import types
import typing
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Sequence

import torch
from transformers import SchedulerType, TrainingArguments

if TYPE_CHECKING:
    from alpaca_nb.training_data import BookData

__all__ = [
    "TrainConfig", "TrainConfigError", "gradient_accumulation_steps", "laptop_config", "peft_available",
    "profile_config", "training_arguments", "upstream_config", "world_size",
]

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
