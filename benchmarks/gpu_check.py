"""The GPU check's Python side (benchmarks/gpu_check.sh runs it): build a model, record a run's peak memory, report.

Usage (the shell script calls these in order; each is usable alone)::

    python benchmarks/gpu_check.py build WORK [--cpu]    # model + tokenizer + data + 1-process configs in WORK
    GPU_CHECK_MEMORY=FILE accelerate launch ... benchmarks/gpu_check.py train TRAIN-ARGS...
    python benchmarks/gpu_check.py report WORK           # tokens/s, peak memory, MFU of both runs

``build`` writes, with nothing downloaded: ``WORK/model``, a LLaMA-7B-shaped Llama (d_model 4096, MLP 11,008,
32 heads, 32,000-token vocabulary, untied head) cut to ``GPU_CHECK_LAYERS`` decoder layers (default 4: 1.07B
parameters, float32 as the upstream preset loads them), with a word-level tokenizer over its synthetic data
(LLaMA's own tokenizer cannot be fetched offline); ``WORK/data.json``, Stanford-format records that each
tokenize to exactly ``GPU_CHECK_TOKENS`` tokens (default 256), so that no padding blurs the token count;
``WORK/fsdp_1proc.yaml``, configs/accelerate/fsdp_8xa100.yaml with one process instead of 8, and
``WORK/lora.yaml``, configs/accelerate/single_gpu_lora.yaml. ``--cpu`` (GPU_CHECK_CPU=1 in the shell script)
builds a toy of the same shape family instead (d_model 64, 2 layers) and marks both configs ``use_cpu``.

``train`` is ``python -m alpaca_nb.train`` (its ``main``) plus bookkeeping the launched module cannot do
itself: a callback on Trainer notes when each optimizer step ends, and rank 0 writes those times and the
process's peak memory (``torch.cuda.max_memory_allocated``, or the peak resident set on a CPU) to the JSON file
``GPU_CHECK_MEMORY`` names.

``report`` reads each run's ``loss_curve.json`` and memory file and prints tokens per second (the steps trained
x the global batch x the tokens per example, over Trainer's training time, and again from the end of the first
step on, which leaves out FSDP's wrapping and the warm-up), peak memory and the model-FLOPs utilisation (``training_compute.implied_mfu``: 6N per token for the full
fine-tune, 4N for LoRA, N the parameters in matrix products, plus the attention term) against the GPU's dense
bf16 peak from prices.toml. An H200 has the H100's GH100 chip and tensor peak (989 TFLOP/s dense bf16); a GPU
that is neither listed nor an H200 gets a matmul measured on it. It ends with ``gpu check: ok`` or the failures.
"""

from __future__ import annotations

import json
import os
import random
import resource
import sys
from dataclasses import replace
from pathlib import Path

LLAMA_7B_CONFIG = {  # huggyllama/llama-7b's config.json, less the layers
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
    "num_key_value_heads": 32, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2,
}
TOY_CONFIG = {**LLAMA_7B_CONFIG, "vocab_size": 4096, "hidden_size": 64, "intermediate_size": 172,
              "num_attention_heads": 4, "num_key_value_heads": 4}
INSTRUCTION_WORDS = 12
RUNS = {"fsdp": "full fine-tune, upstream preset, FSDP (1 process)", "lora": "LoRA r=8 (q_proj, v_proj), bf16 base"}


def _setting(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


# --------------------------------------------------------------------------- build


def _tokenizer(words: list[str]):
    """Return a word-level fast tokenizer over ``words`` and the Alpaca templates, adding BOS as LLaMA's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from alpaca_nb.sft import PROMPT_INPUT, PROMPT_NO_INPUT

    splitter = pre_tokenizers.Whitespace()
    pieces = [piece for template in (PROMPT_INPUT, PROMPT_NO_INPUT) for piece, _ in splitter.pre_tokenize_str(template)]
    vocabulary = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for piece in [*pieces, *words]:
        vocabulary.setdefault(piece, len(vocabulary))
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    tokenizer.pre_tokenizer = splitter
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    # No pad token, as LLaMA: the run adds "[PAD]" with a mean-initialised embedding row (sft.ensure_pad_token).
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=2048)


def _records(tokenizer, words: list[str], count: int, tokens: int) -> list[dict[str, str]]:
    """Return ``count`` records whose prompt + response + EOS tokenize to exactly ``tokens`` tokens."""
    from alpaca_nb.sft import format_prompt

    rng = random.Random(0)
    records = []
    for _ in range(count):
        instruction = " ".join(rng.choice(words) for _ in range(INSTRUCTION_WORDS))
        prompt_tokens = len(tokenizer(format_prompt(instruction, ""))["input_ids"])
        output = " ".join(rng.choice(words) for _ in range(tokens - prompt_tokens - 1))  # EOS is the last token
        records.append({"instruction": instruction, "input": "", "output": output})
    return records


def _one_process(source: Path, target: Path, cpu: bool) -> None:
    import yaml

    config = yaml.safe_load(source.read_text(encoding="utf-8"))
    config.update(num_processes=1, num_machines=1, machine_rank=0, gpu_ids="0")
    if cpu:
        config["use_cpu"] = True
    target.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def build(work: Path, cpu: bool) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alpaca_nb.models import quiet_hf_progress

    work.mkdir(parents=True, exist_ok=True)
    layers = _setting("GPU_CHECK_LAYERS", 2 if cpu else 4)
    tokens = _setting("GPU_CHECK_TOKENS", 64 if cpu else 256)
    count = _setting("GPU_CHECK_GLOBAL_BATCH", 8 if cpu else 128) * max(_setting("GPU_CHECK_STEPS", 3 if cpu else 30),
                                                                         _setting("GPU_CHECK_LORA_STEPS", 3 if cpu else 10))
    config = LlamaConfig(**(TOY_CONFIG if cpu else LLAMA_7B_CONFIG), num_hidden_layers=layers)
    words = [f"w{index}" for index in range(min(2000, config.vocab_size // 2))]
    tokenizer = _tokenizer(words)
    torch.manual_seed(0)
    with torch.device("cpu" if cpu or not torch.cuda.is_available() else "cuda"):
        model = LlamaForCausalLM(config)  # float32: the upstream preset keeps float32 master weights
    with quiet_hf_progress():
        model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    records = _records(tokenizer, words, count, tokens)
    (work / "data.json").write_text(json.dumps(records), encoding="utf-8")
    repo = Path(__file__).resolve().parents[1]
    _one_process(repo / "configs/accelerate/fsdp_8xa100.yaml", work / "fsdp_1proc.yaml", cpu)
    _one_process(repo / "configs/accelerate/single_gpu_lora.yaml", work / "lora.yaml", cpu)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    print(f"built {work / 'model'}: {parameters / 1e9:.3g}B parameters ({layers} layers of LLaMA-7B's shape"
          f"{', toy size' if cpu else ''}); {count} records of {tokens} tokens in {work / 'data.json'}")


# --------------------------------------------------------------------------- train


def train(argv: list[str]) -> int:
    """Run ``alpaca_nb.train.main(argv)``, then write this process's peak memory and the time at which each
    optimizer step ended to ``$GPU_CHECK_MEMORY`` (rank 0)."""
    import time

    import torch
    from transformers import TrainerCallback

    import alpaca_nb.train as module

    step_ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())  # logging_steps=1 reads the loss: the GPU has caught up

    class ClockedTrainer(module.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(StepClock())

    module.Trainer = ClockedTrainer  # the run is otherwise python -m alpaca_nb.train's, unchanged
    status = module.main(argv)
    if int(os.environ.get("RANK", "0")) == 0 and os.environ.get("GPU_CHECK_MEMORY"):
        if torch.cuda.is_available():
            memory = {"device": torch.cuda.get_device_name(0), "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
                      "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
                      "total_bytes": torch.cuda.get_device_properties(0).total_memory}
        else:
            memory = {"device": "cpu", "peak_resident_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        memory["step_end_seconds"] = [end - step_ends[0] for end in step_ends] if step_ends else []
        Path(os.environ["GPU_CHECK_MEMORY"]).write_text(json.dumps(memory), encoding="utf-8")
    return status


# --------------------------------------------------------------------------- report


def _peak_device(memory: dict):
    """Return the GPU row whose bf16 peak the MFU is measured against."""
    from alpaca_nb.training_compute import gpu, gpu_for_device, local_accelerator

    name = memory["device"]
    if name == "cpu":
        return local_accelerator("bfloat16")
    known = gpu_for_device(name)
    if known is not None:
        return known
    if "H200" in name:  # the H100's GH100 chip with more and faster memory: the same dense bf16 tensor peak
        return replace(gpu("H100-80GB"), name=name, memory_gb=141, source="the H100 SXM's datasheet peak")
    return local_accelerator("bfloat16")


def report(work: Path) -> int:
    from alpaca_nb.training_compute import finetune_flops, implied_mfu, lora_flops, shape_from_config
    from transformers import AutoConfig

    shape = shape_from_config(AutoConfig.from_pretrained(work / "model"), "the check's model")
    failures = []
    print(f"model: {shape.n_params / 1e9:.3g}B parameters ({shape.matmul_params / 1e9:.3g}B in matrix products), "
          f"{shape.n_layers} layers, d_model {shape.d_model}")
    for run, title in RUNS.items():
        curve_file, memory_file = work / run / "loss_curve.json", work / f"{run}_memory.json"
        if not curve_file.is_file() or not memory_file.is_file():
            failures.append(f"{run}: no {curve_file.name} or memory record (the run failed: see its log)")
            continue
        curve, memory = json.loads(curve_file.read_text()), json.loads(memory_file.read_text())
        data = curve["data_report"]
        per_step = curve["config"]["global_batch_size"] * data["total_tokens"] / data["kept"]
        tokens, seconds = curve["global_step"] * per_step, curve["elapsed_seconds"]
        ends = memory.get("step_end_seconds", [])
        steady = len(ends) >= 3
        if steady:  # from the end of the first step on: FSDP wrapping and warm-up excluded
            tokens, seconds = (len(ends) - 1) * per_step, ends[-1] - ends[0]
        flops = finetune_flops(shape.matmul_params, tokens, n_layers=shape.n_layers, d_model=shape.d_model,
                               context=data["total_tokens"] / data["kept"])
        flops = lora_flops(flops) if run == "lora" else flops
        device = _peak_device(memory)
        mfu = implied_mfu(flops.total, device, curve["world_size"], seconds / 3600)
        peak = memory.get("peak_allocated_bytes", memory.get("peak_resident_bytes", 0))
        kind = "torch.cuda.max_memory_allocated" if "peak_allocated_bytes" in memory else "peak resident set (CPU)"
        losses = [loss for _, loss in curve["loss_curve"]]
        whole = curve["global_step"] * per_step / curve["elapsed_seconds"]
        rate = f"; {tokens / seconds:,.0f} tokens/s from the end of step 1 on, which the MFU uses" if steady else ""
        print(f"{title}:\n  {curve['global_step']} steps of {curve['config']['global_batch_size']} examples x "
              f"{data['total_tokens'] / data['kept']:.0f} tokens in {curve['elapsed_seconds']:.1f} s ({whole:,.0f} "
              f"tokens/s, set-up included){rate}")
        print(f"  peak memory {peak / 2**30:.2f} GiB ({kind})")
        print(f"  MFU {mfu:.1%} of {device.peak_bf16_tflops:.3g} TFLOP/s ({device.name}; {flops.total:.3g} FLOPs); "
              "the dry run assumes 40 %")
        print(f"  loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "  no loss logged")
        if data["truncated"] or data["kept"] != data["examples"]:
            failures.append(f"{run}: the records did not tokenize to whole examples: {data}")
        if not losses or any(loss != loss for loss in losses):
            failures.append(f"{run}: no finite loss logged")
    print("gpu check: ok" if not failures else "gpu check: FAILED\n  " + "\n  ".join(failures))
    return 1 if failures else 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["build"] and len(argv) >= 2:
        build(Path(argv[1]), cpu="--cpu" in argv[2:])
        return 0
    if argv[:1] == ["train"]:
        return train(argv[1:])
    if argv[:1] == ["report"] and len(argv) == 2:
        return report(Path(argv[1]))
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
