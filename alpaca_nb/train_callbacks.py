"""What the fine-tune adds to transformers' Trainer: a tqdm bar in a notebook or terminal, a stop after a number of
steps that still saves, and the log of which layers FSDP wraps (the check stanford_alpaca#58 needed).
"""

from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback

from alpaca_nb.progress import progress_bar

logger = logging.getLogger("alpaca_nb.train")  # train's logger: its lines read as the fine-tune's

__all__ = [
    "fsdp_units",
]


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
