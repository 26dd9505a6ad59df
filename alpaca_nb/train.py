"""Fine-tune a causal LM on Alpaca data with transformers' Trainer: the upstream recipe and a laptop preset.

Taught in chapter 4 (book/04_fine_tuning.md); the cluster commands are in book/appendix_cluster.md.
``python -m alpaca_nb.train --preset laptop|upstream ...`` runs the same code on a laptop CPU, under
``accelerate launch`` on 8 GPUs (FSDP or DeepSpeed, chosen by the accelerate config file, not here), or
as several CPU processes over gloo (the test of the distributed path). Every distributed detail is left
to ``Trainer`` and accelerate; ``train_config`` turns a :class:`TrainConfig` into ``TrainingArguments``
(keeping the global batch fixed whatever the number of processes), ``training_data`` chooses the records and
``train_callbacks`` adds the progress bar and the FSDP check; this module runs the Trainer, resumes from the
last checkpoint and saves the final model without gathering it on the GPUs (stanford_alpaca#65).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from transformers import PrinterCallback, Trainer
from transformers.utils.import_utils import is_in_notebook

from alpaca_nb.batching import AlpacaCollator, enable_packed_attention, padding_free_collator
from alpaca_nb.jsonl import write_text_atomically
from alpaca_nb.models import load_model, quiet_hf_progress, record_prompt_template
from alpaca_nb.plots import plot_loss_curve
from alpaca_nb.sft import SFTReport, build_dataset, ensure_pad_token
from alpaca_nb.train_callbacks import _ProgressBar, _ReportFsdpUnits, _StopAfterSteps, fsdp_units
from alpaca_nb.train_config import (
    LAPTOP_LORA_TARGETS, LORA_LEARNING_RATE, TrainConfig, TrainConfigError, bf16_is_fast, config_from_args,
    gradient_accumulation_steps, half_precision_dtype, laptop_config, peft_available, profile_config,
    training_arguments, upstream_config, uses_bf16, uses_fp16, world_size,
)
from alpaca_nb.training_data import (
    MIX_FILE, TRAINING_DATA_FILE, BookData, book_training_data, read_book_data, training_records,
)

__all__ = [
    "LOSS_CURVE_FILE", "BookData", "TrainConfig", "TrainConfigError", "TrainResult", "book_training_data",
    "fsdp_units", "gradient_accumulation_steps", "last_checkpoint", "laptop_config", "load_result", "main", "peft_available", "plot_loss_curve",
    "profile_config", "read_book_data", "train", "training_arguments", "training_records", "upstream_config", "world_size",
]

logger = logging.getLogger("alpaca_nb.train")  # the same name under `python -m`

LOSS_CURVE_FILE = "loss_curve.json"
FINAL_DIR = "final"


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


# --------------------------------------------------------------------------- TrainingArguments


def _watched() -> bool:
    """Return True at a terminal or in a notebook, where a progress bar beats a log line per step."""
    return sys.stderr.isatty() or is_in_notebook()


# --------------------------------------------------------------------------- the run


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


# --------------------------------------------------------------------------- command line


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
