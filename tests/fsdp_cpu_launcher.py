"""Run ``alpaca_nb.train`` under accelerate's own FSDP2 on CPU processes (gloo): the FSDP test without a GPU.

Launched by tests/test_train.py as
``accelerate launch --config_file configs/accelerate/fsdp_8xa100.yaml --num_processes 2 --mixed_precision no
tests/fsdp_cpu_launcher.py <alpaca_nb.train options>``. Each process then runs ``alpaca_nb.train.main`` unchanged:
Trainer, accelerate's ``FullyShardedDataParallelPlugin`` read from the config's FSDP_* variables,
``Accelerator._prepare_fsdp2`` -> ``fsdp2_prepare_model`` (fully_shard per decoder layer by the config's
TRANSFORMER_BASED_WRAP), sharded checkpoints, resume and the final save of ``alpaca_nb.train._save_final``.

What is forced, and only that: accelerate 1.15 turns FSDP on only for GPU-like devices. In
``AcceleratorState.__init__`` (accelerate/state.py, lines 986-1016 in 1.15.0) the branch that sets
``DistributedType.FSDP`` and keeps the plugin runs only when ``distributed_type`` is one of MULTI_GPU, MULTI_MLU,
MULTI_SDAA, MULTI_MUSA, MULTI_NPU, MULTI_XPU, MULTI_HPU or MULTI_NEURON. A CPU run (``TrainingArguments(
use_cpu=True)``, as alpaca_nb.train passes without CUDA) is MULTI_CPU, so accelerate drops the plugin and trains
plain DDP without a word (tests/test_train.py::test_accelerate_does_not_shard_with_fsdp_on_cpu). Below, after
accelerate's own ``__init__`` has run, a MULTI_CPU state that was handed an FSDP plugin gets what that branch
does for a GPU (distributed type FSDP, the plugin kept, its mixed precision set), and nothing else changes: the
device stays CPU, the backend gloo, and torch's ``fully_shard`` shards CPU tensors.

With ``ALPACA_NB_STATE_DICT_LOG=path`` set, every call of torch's ``get_model_state_dict`` (which accelerate
uses for both the sharded checkpoints and the final full save) appends one JSON line per rank to
``path.rank<N>``: the options, and how much of the model that rank held, to show what was gathered where.
"""

from __future__ import annotations

import json
import os
import sys

import torch.distributed.checkpoint.state_dict as dcp_state_dict
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_accelerate_init = AcceleratorState.__init__


def _init_keeping_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _accelerate_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        # What state.py lines 1010-1016 do for a GPU-like distributed type.
        self.distributed_type = DistributedType.FSDP
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = self.distributed_type


AcceleratorState.__init__ = _init_keeping_fsdp_on_cpu


_get_model_state_dict = dcp_state_dict.get_model_state_dict


def _logged_get_model_state_dict(model, *, submodules=None, options=None):
    state_dict = _get_model_state_dict(model, submodules=submodules, options=options)
    from torch.distributed.tensor import DTensor

    held = sum((value.to_local() if isinstance(value, DTensor) else value).numel() for value in state_dict.values())
    record = {
        "rank": int(os.environ.get("RANK", "0")),
        "full_state_dict": bool(options and options.full_state_dict),
        "cpu_offload": bool(options and options.cpu_offload),
        "keys": len(state_dict),
        "elements_held": held,                                            # this rank's own memory
        "elements_in_state_dict": sum(value.numel() for value in state_dict.values()),  # global shapes
        "elements_in_model": sum(parameter.numel() for parameter in model.parameters()),
        "devices": sorted({str((value.to_local() if isinstance(value, DTensor) else value).device)
                           for value in state_dict.values()}),
    }
    with open(f"{os.environ['ALPACA_NB_STATE_DICT_LOG']}.rank{record['rank']}", "a", encoding="utf-8") as log:
        log.write(json.dumps(record) + "\n")
    return state_dict


if os.environ.get("ALPACA_NB_STATE_DICT_LOG"):
    # accelerate imports get_model_state_dict inside its functions, at call time: this replacement is seen.
    dcp_state_dict.get_model_state_dict = _logged_get_model_state_dict


if __name__ == "__main__":
    from alpaca_nb.train import main

    sys.exit(main(sys.argv[1:]))
