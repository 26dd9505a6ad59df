"""The cost of a fine-tune predicted before launch (`alpaca-nb train --dry-run`), set beside what it took on the
report card, and the GPU check script that will measure it on a GPU (benchmarks/gpu_check.sh)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest

from alpaca_nb.training_compute import (
    LLAMA_7B, SMOLLM2_135M, DataTokens, data_tokens, gpu, implied_mfu, lora_trainable_params, model_shape,
    predict_training, shape_from_config, training_memory, training_steps, zero3_offload_memory,
)

REPO = Path(__file__).resolve().parents[1]


def _llama_7b_config(layers: int = 32):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)


# --------------------------------------------------------------------------- arithmetic


def test_steps_are_counted_as_trainer_counts_them_whatever_the_number_of_gpus():
    # Upstream's recipe on the 52,002 records: 407 steps an epoch (the last one short), 1,221 in 3 epochs.
    assert training_steps(52_002, 3, 128, 4, 8) == (1221, 4)
    assert training_steps(52_002, 3, 128, 4, 1) == (1221, 32)
    assert training_steps(52_002, 3, 128, 4, 16) == (1221, 2)
    # 10 examples, micro-batches of 4 on 2 processes: 3 micro-batches, 2 per process (accelerate repeats one),
    # accumulation 1: 2 steps an epoch.
    assert training_steps(10, 2, 8, 4, 2) == (4, 1)
    assert training_steps(52_002, 3, 128, 4, 8, max_steps=5) == (5, 4)
    with pytest.raises(ValueError, match="not a whole number of micro-batches"):
        training_steps(100, 1, 128, 4, 3)


@pytest.mark.parametrize("examples, epochs, global_batch", [(10, 2, 8), (37, 3, 16), (13, 0.5, 4)])
def test_the_step_count_is_trainer_s_own(tiny_llama, tmp_path, examples, epochs, global_batch):
    """Trainer's own count (set_initial_training_values on its real dataloader) for one process."""
    from transformers import Trainer

    from alpaca_nb.models import load_model
    from alpaca_nb.train import TrainConfig, training_arguments

    config = TrainConfig(output_dir=str(tmp_path), epochs=epochs, global_batch_size=global_batch, bf16=False)
    args = training_arguments(config, processes=1)
    model, _ = load_model(str(tiny_llama))
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": [1, 2], "labels": [1, 2]}] * examples)
    trainer_steps = trainer.set_initial_training_values(args, trainer.get_train_dataloader())[-1]
    assert training_steps(examples, epochs, global_batch, 4, 1) == (trainer_steps, args.gradient_accumulation_steps)


def test_the_prediction_is_the_flop_time_and_memory_models_put_together():
    data = DataTokens(52_002, 120.0, 200.0, "hand-made")
    prediction = predict_training(LLAMA_7B, data, gpu_name="A100-80GB", n_gpus=8, mfu=0.4)
    a100 = gpu("A100-80GB")
    tokens = 3 * 52_002 * 200.0  # upstream's collator pads: the padded mean is what is computed on
    assert prediction.steps == 1221 and prediction.accumulation == 4 and prediction.tokens == pytest.approx(tokens)

    full = prediction.layout("full")
    dense = 6 * (6.74e9 - 32000 * 4096) * tokens  # the input embedding is a lookup, no matmul
    attention = 6 * 32 * 200.0 * 4096 * tokens
    assert full.flops.total == pytest.approx(dense + attention)
    hours = full.flops.total / (8 * a100.peak_bf16_tflops * 1e12 * 0.4) / 3600
    assert full.time.wall_hours == pytest.approx(hours) and full.time.cost_usd == pytest.approx(hours * 8 * 2.45)
    assert full.memory_per_gpu == training_memory(6.74e9, 8, sharded=True)  # FSDP full shard, 4 x 512 tokens

    lora = prediction.layout("lora")
    assert lora.flops.total == pytest.approx(dense * 4 / 6 + attention)
    assert lora_trainable_params(LLAMA_7B, 8, ("q_proj", "v_proj")) == 4_194_304  # alpaca-lora's r=8 adapter
    assert lora.memory_per_gpu.weights == pytest.approx(2 * 6.74e9 + 4 * 4_194_304)

    zero3 = prediction.layout("zero3")
    assert zero3.time_is_lower_bound and zero3.flops == full.flops
    # Under zero.Init (the project's config: zero3_init_flag true), DeepSpeed's estimate: the largest layer's
    # 16-bit weights and gradients, plus the activations, and 18 B per parameter in the node's RAM.
    on_gpu, in_ram = zero3_offload_memory(LLAMA_7B, 8, zero_init=True)
    assert zero3.memory_per_gpu == on_gpu and zero3.host_memory_per_node == pytest.approx(in_ram)
    assert on_gpu.weights + on_gpu.gradients == 4 * 32000 * 4096 and on_gpu.activations == 34 * 512 * 4 * 4096 * 32
    assert in_ram == pytest.approx(6.74e9 * 18 * 1.5)
    # Without it, the engine moves the whole bf16 model onto each GPU first, and each process's fp32 copy in RAM
    # (4 B x 8 GPUs) beats the 18 B per parameter of the partitioned state.
    on_gpu, in_ram = zero3_offload_memory(LLAMA_7B, 8, zero_init=False)
    assert on_gpu.total == 2 * 6.74e9 and in_ram == pytest.approx(6.74e9 * 32 * 1.5)
    assert prediction.chosen == full.layout
    assert predict_training(LLAMA_7B, data, lora=True).chosen == lora.layout

    # A padding-free run computes on the real tokens; max_steps counts global batches instead of epochs.
    assert predict_training(LLAMA_7B, data, padded=False).tokens == pytest.approx(3 * 52_002 * 120.0)
    assert predict_training(LLAMA_7B, data, max_steps=10).tokens == pytest.approx(10 * 128 * 200.0)


def test_the_paper_s_three_hours_are_set_beside_the_prediction():
    prediction = predict_training(LLAMA_7B, DataTokens(52_002, 120.0, 200.0, "hand-made"))
    text = "\n".join(prediction.lines())
    full = prediction.layout("full")
    assert "3 hours on 8 80GB A100s, less than $100" in text
    assert f"{implied_mfu(full.flops.total, 'A100-80GB', 8, 3.0):.1%} MFU" in text
    assert "1,221 optimizer steps" in text and "<- this run" in text and "CPU RAM per node" in text
    # On other hardware the paper's MFU is not computed: its 3 hours were on 8 A100s.
    other = "\n".join(predict_training(LLAMA_7B, DataTokens(52_002, 120.0, 200.0, "x"), gpu_name="H100-80GB",
                                       n_gpus=1, global_batch=128).lines())
    assert "would mean" not in other


# --------------------------------------------------------------------------- shapes and tokens, no weights


def test_shapes_come_from_configs_on_the_meta_device_and_match_the_known_ones():
    from transformers import LlamaConfig

    llama = shape_from_config(_llama_7b_config(), "LLaMA-7B")
    assert llama.n_params == 6_738_415_616 == pytest.approx(LLAMA_7B.n_params, rel=1e-3)
    assert (llama.embedding_params, llama.largest_layer_params, llama.d_ffn, llama.d_kv, llama.vocab) == (
        LLAMA_7B.embedding_params, LLAMA_7B.largest_layer_params, LLAMA_7B.d_ffn, LLAMA_7B.d_kv, LLAMA_7B.vocab)
    smol = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)
    assert asdict(shape_from_config(smol, SMOLLM2_135M.name)) == asdict(SMOLLM2_135M)
    # The laptop run's LoRA (r=16 on all seven projections) trains what peft reported: 4,884,480 parameters.
    seven = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert lora_trainable_params(SMOLLM2_135M, 16, seven) == 4_884_480
    with pytest.raises(ValueError, match="LoRA target modules"):
        lora_trainable_params(SMOLLM2_135M, 8, ("qkv_proj",))


def test_model_shape_reads_a_folder_s_config_and_refuses_what_it_would_have_to_download(tmp_path, monkeypatch):
    from alpaca_nb.models import ModelError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _llama_7b_config(layers=2).save_pretrained(tmp_path)  # a config.json alone: no weights on disk
    shape = model_shape(tmp_path)
    assert shape.n_layers == 2 and shape.n_params == 2 * 202_383_360 + 2 * 131_072_000 + 4096
    assert model_shape("huggyllama/llama-7b").n_params == LLAMA_7B.n_params and model_shape(None) == SMOLLM2_135M
    with pytest.raises(ModelError, match="no config.json on this machine"):
        model_shape("someone/unknown-model-7b")


def test_token_counts_follow_tokenize_example_and_the_character_estimate_is_close():
    from alpaca_nb.data import load_alpaca_data
    from alpaca_nb.models import load_tokenizer
    from alpaca_nb.sft import tokenize_example

    records = load_alpaca_data(asset="alpaca_sample")
    tokenizer = load_tokenizer()
    counted = data_tokens(records, tokenizer=tokenizer)
    lengths = [len(tokenize_example(r.instruction, r.input, r.output, tokenizer)["input_ids"]) for r in records]
    assert counted.examples == 100 and counted.mean_tokens == pytest.approx(sum(lengths) / len(lengths))
    assert counted.mean_padded_tokens > counted.mean_tokens  # random micro-batches of 4, each padded
    estimated = data_tokens(records)
    assert estimated.mean_tokens == pytest.approx(counted.mean_tokens, rel=0.05)  # CHARS_PER_TOKEN was measured so
    assert "characters per token" in estimated.source and "counted with" in counted.source
    assert data_tokens(records, 52_002, sample=10).examples == 52_002


# --------------------------------------------------------------------------- the dry run


@pytest.fixture
def no_model_loading(monkeypatch):
    """Make loading a model, or downloading anything, fail the test."""
    import alpaca_nb.data
    import alpaca_nb.models
    import alpaca_nb.train

    def refuse(*args, **kwargs):
        raise AssertionError("the dry run loaded a model or downloaded a file")

    monkeypatch.setattr(alpaca_nb.models, "load_model", refuse)
    monkeypatch.setattr(alpaca_nb.train, "load_model", refuse)
    monkeypatch.setattr(alpaca_nb.data, "download", refuse)


def test_the_dry_run_prints_steps_flops_time_dollars_and_memory_and_loads_no_model(no_model_loading, capsys,
                                                                                    tmp_path):
    from alpaca_nb.cli import main

    status = main(["train", "--dry-run", "--preset", "upstream", "--model", "huggyllama/llama-7b"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "a prediction for 8 x A100-80GB; nothing is loaded or trained" in out
    assert "LLaMA-7B (huggyllama/llama-7b): 6.74e+09 parameters" in out
    assert "52,002 examples" in out and "1,221 optimizer steps" in out and "4 accumulation" in out
    for layout in ("full fine-tune, FSDP full shard", "LoRA r=8 on q_proj, v_proj", "ZeRO-3, parameters and Adam on CPU"):
        assert layout in out
    assert "the paper (Taori et al. 2023" in out and "MFU" in out
    assert not (tmp_path / "unused-by-a-dry-run").exists() and not Path("unused-by-a-dry-run").exists()

    # The run's own options change the prediction: LoRA on one GPU.
    assert main(["train", "--dry-run", "--preset", "upstream", "--model", "huggyllama/llama-7b", "--lora",
                 "--gpu", "H100-80GB", "--gpus", "1", "--mfu", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "1 x H100-80GB" in out and "x 32 accumulation" in out and "assumed MFU 30%" in out
    assert out.count("<- this run") == 1 and "LoRA r=8 on q_proj, v_proj" in out.split("<- this run")[0].splitlines()[-1]

    # The laptop preset's global batch of 16 does not split over 8 GPUs: the default is then one.
    assert main(["train", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1 x A100-80GB" in out and "SmolLM2-135M-Instruct (embedded)" in out and "(padding-free batches)" in out
    assert "LoRA r=16 on 7 projections" in out.split("<- this run")[0].splitlines()[-1]


def test_the_dry_run_of_a_local_model_counts_with_its_tokenizer_and_refuses_unknown_gpus(no_model_loading, capsys,
                                                                                         tiny_llama):
    from alpaca_nb.cli import main

    assert main(["train", "--dry-run", "--model", str(tiny_llama), "--data", "alpaca_sample", "--gpus", "1",
                 "--global-batch-size", "16", "--eval-examples", "0"]) == 0
    out = capsys.readouterr().out
    assert f"counted with {tiny_llama}" in out and "100 examples" in out
    assert main(["train", "--dry-run", "--model", str(tiny_llama), "--gpu", "TPU-v9"]) == 2
    assert "no price known for GPU 'TPU-v9'" in capsys.readouterr().err


# --------------------------------------------------------------------------- the report card


def test_the_report_card_sets_the_predicted_training_time_beside_the_time_taken(tmp_path, monkeypatch):
    import alpaca_nb.train
    from alpaca_nb import __version__
    from alpaca_nb import reproduce as module
    from alpaca_nb.profiles import load_profile
    from alpaca_nb.sft import SFTReport

    result = SimpleNamespace(elapsed_seconds=20.0, total_parameters=1e8, lora=False, world_size=1,
                             data_report=SFTReport(10, 10, 0, 0, 400, 1000), loss_curve=[(1, 2.0), (2, 1.5)],
                             eval_loss_before=2.1, eval_loss_after=1.6)
    device = gpu("A100-80GB")
    measures = module.training_time_prediction(result, global_batch_size=4, steps_this_run=5, device=device)
    flops = 6 * 1e8 * 5 * 4 * 100  # 6ND on the 20 examples of the 5 steps this run trained, 100 tokens each
    assert measures["predicted_train_seconds"] == pytest.approx(flops / (312e12 * 0.4))
    assert measures["achieved_mfu"] == pytest.approx(flops / (312e12 * 20.0)) and measures["train_seconds"] == 20.0
    assert module.training_time_prediction(result, 4, 0, device) == {}

    provenance = module.Provenance("fine_tune", "abc", {}, {}, "laptop", __version__, 1, "2026-12-05T00:00:00+00:00",
                                   30.0, measures=measures)
    (tmp_path / "fine_tune").mkdir()
    (tmp_path / "fine_tune" / module.MANIFEST).write_text(json.dumps(asdict(provenance)))
    monkeypatch.setattr(module, "_status", lambda stage, run: ("complete" if stage == "fine_tune" else "new", {}, {}, ""))
    monkeypatch.setattr(alpaca_nb.train, "load_result", lambda folder: result)
    report = module.build_report(tmp_path, load_profile("laptop", smoke=True))
    metrics = {metric["key"]: metric for metric in report["metrics"]}
    assert metrics["train_hours_predicted"]["ours"] == pytest.approx(measures["predicted_train_seconds"] / 3600)
    assert metrics["train_hours"]["ours"] == pytest.approx(20.0 / 3600)
    assert metrics["train_mfu"]["ours"] == pytest.approx(measures["achieved_mfu"])
    assert "at 40% MFU of 312 TFLOP/s peak" in metrics["train_hours_predicted"]["label"]
    text = module.report_markdown(report)
    predicted_row = text.index("training hours predicted")
    assert predicted_row < text.index("training hours taken") < text.index("model-FLOPs utilisation the run reached")


def test_the_cpu_s_peak_is_measured_when_no_listed_gpu_is_there():
    from alpaca_nb.training_compute import gpu_for_device, local_accelerator

    assert gpu_for_device("NVIDIA A100-SXM4-80GB") == gpu("A100-80GB")
    assert gpu_for_device("NVIDIA H100 80GB HBM3").name == "H100-80GB" and gpu_for_device("Tesla T4") is None
    import torch

    if not torch.cuda.is_available():
        here = local_accelerator("float32")
        assert here.name.startswith("this CPU") and 0 < here.peak_bf16_tflops < 100 and here.usd_per_hour == 0


# --------------------------------------------------------------------------- the GPU check


def test_the_gpu_check_script_parses():
    assert subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_check.sh")]).returncode == 0


def test_the_gpu_check_runs_its_toy_on_a_cpu(tmp_path):
    """GPU_CHECK_CPU=1: the same script, model builder, launches and report on a toy model (about 40 s)."""
    env = {**os.environ, "GPU_CHECK_CPU": "1", "PYTHON": sys.executable, "TMPDIR": str(tmp_path),
           "OUT": str(tmp_path)}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=600, env=env, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert output.count("from the end of step 1 on") == 2 and output.count("MFU") >= 2 and "gpu check: ok" in output
    assert "full fine-tune, upstream preset, FSDP (1 process)" in output and "LoRA r=8" in output
    assert (tmp_path / "fsdp.log").is_file() and (tmp_path / "gpu_check_summary.txt").is_file()
    assert math.isfinite(float(output.split("peak memory ")[1].split(" GiB")[0]))
