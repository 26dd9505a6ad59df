"""The cluster launch path without a cluster: accelerate's FSDP2 preparation in one gloo CPU process, resume after
a save cut off by preemption, the SLURM script's dry run, the accelerate configs read by accelerate's own parser,
DeepSpeed ZeRO-3's partitioned embeddings, and the fp16 fallback for GPUs without bf16 (issue 34).

accelerate 1.15 enables FSDP only for GPU-like devices (AcceleratorState keeps MULTI_CPU on a CPU and drops the
plugin, tests/test_train.py::test_accelerate_does_not_shard_with_fsdp_on_cpu). ``FORCE_FSDP2`` below puts FSDP
back in AcceleratorState so that the Trainer runs accelerate's real FSDP2 code (fsdp2_prepare_model, the FULL
state dict at save) on the CPU; everything else is the project's and the libraries' own code.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from alpaca_nb.train import (
    TrainConfig, half_precision_dtype, last_checkpoint, load_result, train, uses_bf16, uses_fp16,
)

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = ROOT / "configs" / "accelerate"
SBATCH = ROOT / "configs" / "slurm" / "alpaca_train.sbatch"

# AcceleratorState copies PartialState's distributed type (MULTI_CPU) back in at every AcceleratorState() call,
# so FSDP is put back after each one, not only after the first.
FORCE_FSDP2 = """
import accelerate.state
from accelerate.utils import DistributedType

_original_init = accelerate.state.AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    plugin = fsdp_plugin if fsdp_plugin is not None else self.__dict__.get("fsdp_plugin")
    if plugin is not None:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = plugin


accelerate.state.AcceleratorState.__init__ = _fsdp_on_cpu
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _accelerate_environment(config_file: Path) -> dict[str, str]:
    """Return the variables `accelerate launch --config_file config_file` gives each process (none started)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    arguments = launch_command_parser().parse_args(["--config_file", str(config_file), "-m", "alpaca_nb.train"])
    arguments, defaults, _ = _validate_launch_command(arguments)
    if arguments.use_deepspeed:
        arguments.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command
        return prepare_deepspeed_cmd_env(arguments)[1]
    return prepare_multi_gpu_env(arguments)


def _one_process(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1", **(extra or {})}


# --------------------------------------------------------------------------- FSDP2: held-out loss, units, LoRA save


@pytest.fixture(scope="module")
def fsdp2_lora_run(tiny_llama, tmp_path_factory) -> dict:
    """Run 2 steps of a full fine-tune with 4 held-out records, then 2 of LoRA, through accelerate's FSDP2 path
    (1 gloo process), then try Trainer.evaluate() on a fresh, unprepared Trainer as train() used to. Returns
    what it printed."""
    output_dir = tmp_path_factory.mktemp("fsdp2-lora") / "run"
    probe = FORCE_FSDP2 + textwrap.dedent(f"""
        import json, logging
        from dataclasses import replace
        from alpaca_nb.batching import AlpacaCollator
        from alpaca_nb.data import load_alpaca_data
        from alpaca_nb.models import load_model
        from alpaca_nb.sft import build_dataset
        from alpaca_nb.train import TrainConfig, train, training_arguments
        from transformers import Trainer

        logged = []
        handler = logging.Handler()
        handler.emit = lambda record: logged.append(record.getMessage())
        logging.getLogger("alpaca_nb.train").addHandler(handler)
        logging.getLogger("alpaca_nb.train").setLevel(logging.INFO)
        config = TrainConfig(output_dir={str(output_dir / "full")!r}, model={str(tiny_llama)!r},
                             data="alpaca_sample", n_examples=8, n_eval_examples=4, epochs=1, learning_rate=3e-2,
                             global_batch_size=2, per_device_batch_size=2, max_length=128, max_steps=2,
                             save_steps=100, bf16=False, save_final_model=False)
        result = train(config)
        lora = train(replace(config, output_dir={str(output_dir / "lora")!r}, n_eval_examples=0, lora=True,
                             lora_target_modules=("q_proj", "v_proj"), save_final_model=True))

        model, tokenizer = load_model(config.model)
        held_out = build_dataset(load_alpaca_data(asset="alpaca_sample")[-4:], tokenizer, max_length=128)[0]
        trainer = Trainer(model=model, args=training_arguments(config, 1), eval_dataset=held_out,
                          data_collator=AlpacaCollator(tokenizer))
        try:
            trainer.evaluate()
            evaluate_before_training = None
        except ValueError as error:
            evaluate_before_training = str(error)
        print("RESULT " + json.dumps({{
            "fsdp": trainer.is_fsdp_enabled, "eval_loss_before": result.eval_loss_before,
            "eval_loss_after": result.eval_loss_after, "final_model_dir": lora.final_model_dir,
            "evaluate_before_training": evaluate_before_training,
            "units": [line for line in logged if line.startswith("FSDP units")]}}))
    """)
    environment = _one_process(_accelerate_environment(ACCELERATE_CONFIGS / "fsdp_8xa100.yaml"))
    finished = subprocess.run([sys.executable, "-c", probe], env=environment, capture_output=True, text=True,
                              timeout=300, cwd=ROOT)
    assert finished.returncode == 0, finished.stderr[-4000:]
    line = next(line for line in finished.stdout.splitlines() if line.startswith("RESULT "))
    return {**json.loads(line.removeprefix("RESULT ")), "lora_output_dir": str(output_dir / "lora")}


def test_held_out_loss_before_training_is_measured_under_fsdp2(fsdp2_lora_run):
    """transformers#48841: Trainer.evaluate() on an unprepared model prepares it alone, and accelerate 1.15 refuses
    under FSDP2 (accelerator.py, "a model and optimizer must be passed together"); train() measures it at step 0."""
    assert fsdp2_lora_run["fsdp"]
    assert "a model and optimizer must be passed together" in fsdp2_lora_run["evaluate_before_training"]
    before, after = fsdp2_lora_run["eval_loss_before"], fsdp2_lora_run["eval_loss_after"]
    assert isinstance(before, float) and isinstance(after, float) and before != after


def test_fsdp2_logs_the_units_accelerate_shards(fsdp2_lora_run):
    """The line book/appendix_cluster.md tells instructors to look for: accelerate 1.15's fsdp2_prepare_model shards
    each decoder layer, the input embedding, and the tail (final norm and lm_head), then the root."""
    full_fine_tune, lora = fsdp2_lora_run["units"]
    assert full_fine_tune == ("FSDP units: 1 × LlamaForCausalLM, 1 × Embedding, 2 × LlamaDecoderLayer, "
                              "1 × LlamaRMSNorm, 1 × Linear")
    assert lora == "FSDP units: 1 × PeftModelForCausalLM, 1 × Embedding, 2 × LlamaDecoderLayer, 1 × Linear"


def test_lora_under_fsdp2_saves_a_merged_model_that_load_result_opens(fsdp2_lora_run, tiny_llama):
    """Trainer.save_model under FSDP/DeepSpeed writes the adapter only; train() merges it into the base on rank 0."""
    from peft import PeftModel

    from alpaca_nb.models import load_model

    result = load_result(fsdp2_lora_run["lora_output_dir"])
    final = Path(result.final_model_dir)
    assert final == Path(fsdp2_lora_run["final_model_dir"]) and result.lora
    assert not (final / "adapter_config.json").exists()  # else transformers reads the folder as an adapter
    assert (final / "adapter" / "adapter_config.json").is_file()
    merged, tokenizer = load_model(final)
    base, _ = load_model(tiny_llama)
    with warnings.catch_warnings():  # peft 0.21 reads a property transformers 5 deprecates
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        with_adapter = PeftModel.from_pretrained(base, str(final / "adapter")).eval()
    inputs = tokenizer("Give three tips for staying healthy.", return_tensors="pt")
    with torch.no_grad():
        merged_logits = merged(**inputs).logits
        adapter_logits = with_adapter(**inputs).logits
    assert torch.allclose(merged_logits, adapter_logits, atol=1e-4)
    untouched, _ = load_model(tiny_llama)
    with torch.no_grad():
        assert not torch.allclose(merged_logits, untouched(**inputs).logits, atol=1e-4)  # the adapter moved it


# --------------------------------------------------------------------------- resume after preemption


def _checkpoint(folder: Path, step: int, state: str | None) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"\0" * 16)
    if state is not None:
        (path / "trainer_state.json").write_text(state)
    return path


def test_last_checkpoint_skips_checkpoints_cut_off_while_saving(tmp_path):
    """Trainer._save_checkpoint writes trainer_state.json last (transformers 5.24 trainer.py:3417): a folder
    without a whole one was interrupted, whatever its number."""
    complete = _checkpoint(tmp_path, 200, json.dumps({"global_step": 200}))
    _checkpoint(tmp_path, 400, None)                                   # killed before trainer_state.json
    _checkpoint(tmp_path, 600, '{"global_step": 600, "log_hist')      # killed while writing it
    _checkpoint(tmp_path, 800, json.dumps({"global_step": 1}))        # not the state of this step
    (tmp_path / "checkpoint-1000").write_text("a file, not a folder")
    assert last_checkpoint(tmp_path) == str(complete)
    assert last_checkpoint(tmp_path / "missing") is None
    only_partial = tmp_path / "partial"
    _checkpoint(only_partial, 200, None)
    assert last_checkpoint(only_partial) is None


def test_resume_after_preemption_continues_from_the_last_complete_checkpoint(tiny_llama, tmp_path):
    """A job killed while saving checkpoint-5 leaves it half-written; the requeued run resumes from checkpoint-3.
    transformers' own get_last_checkpoint takes checkpoint-5, and Trainer.train then stops with FileNotFoundError
    on its trainer_state.json (transformers 5.24 trainer.py:1565): every requeue of the job would fail the same way."""
    config = TrainConfig(output_dir=str(tmp_path), model=str(tiny_llama), data="alpaca_sample", epochs=1,
                         learning_rate=3e-3, global_batch_size=4, per_device_batch_size=2, max_length=128,
                         max_steps=6, save_steps=3, save_total_limit=None, seed=7, bf16=False,
                         stop_after_steps=3, save_final_model=False)
    first = train(config)
    assert first.interrupted and first.global_step == 3
    half_written = tmp_path / "checkpoint-5"
    half_written.mkdir()
    for name in ("model.safetensors", "config.json"):
        (half_written / name).write_bytes((tmp_path / "checkpoint-3" / name).read_bytes())
    resumed = train(replace(config, stop_after_steps=None, resume=True))
    assert resumed.global_step == 6
    assert [step for step, _ in resumed.loss_curve] == [1, 2, 3, 4, 5, 6]
    assert resumed.loss_curve[:3] == first.loss_curve  # restored from checkpoint-3's state, not trained again


# --------------------------------------------------------------------------- the SLURM script


def _dry_run(tmp_path: Path, output_dir: Path) -> subprocess.CompletedProcess:
    """Run the sbatch script with DRY_RUN=1 as SLURM would on 2 nodes × 8 GPUs, `scontrol` stubbed."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    scontrol = stubs / "scontrol"
    scontrol.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "gpu17\\ngpu18\\n"\n')
    scontrol.chmod(0o755)
    environment = {
        "PATH": f"{stubs}:{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path),
        "ALPACA_NB_DATA_DIR": os.environ.get("ALPACA_NB_DATA_DIR", ""), "DRY_RUN": "1",
        "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[17-18]", "SLURM_CPUS_PER_TASK": "64",
        "SLURM_SUBMIT_DIR": str(ROOT), "OUTPUT_DIR": str(output_dir),
    }
    return subprocess.run(["bash", str(SBATCH)], env=environment, capture_output=True, text=True, timeout=120)


def test_sbatch_dry_run_prints_each_nodes_launch_line(tmp_path):
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    text = SBATCH.read_text()
    assert "#SBATCH --open-mode=append" in text  # a requeue keeps the first attempt's log
    finished = _dry_run(tmp_path, tmp_path / "fresh")
    assert finished.returncode == 0, finished.stderr
    lines = finished.stdout.splitlines()
    srun = next(line for line in lines if line.startswith("dry run: srun"))
    # Slurm >= 22.05: srun does not inherit --cpus-per-task from sbatch
    assert "--cpus-per-task=64" in srun.split() and "--ntasks-per-node=1" in srun.split()
    nodes = [line for line in lines if line.startswith("node ")]
    assert len(nodes) == 2
    for rank, line in enumerate(nodes):
        words = line.split()
        assert words[:4] == ["node", f"{rank}:", "accelerate", "launch"]
        options = dict(zip(words[3:], words[4:]))
        assert options["--machine_rank"] == str(rank)  # read inside each node's task, not on the first node
        assert options["--num_machines"] == "2" and options["--num_processes"] == "16"
        assert options["--main_process_ip"] == "gpu17"
        assert options["--config_file"] == "configs/accelerate/fsdp_8xa100.yaml"
        assert options["--preset"] == "upstream" and options["--output-dir"] == str(tmp_path / "fresh")
        assert "--resume" not in words


def test_sbatch_resumes_only_when_a_complete_checkpoint_exists(tmp_path):
    output_dir = tmp_path / "run"
    _checkpoint(output_dir, 200, None)  # preempted during the first save
    finished = _dry_run(tmp_path, output_dir)
    assert finished.returncode == 0, finished.stderr
    assert all("--resume" not in line.split() for line in finished.stdout.splitlines() if line.startswith("node "))
    _checkpoint(output_dir, 100, json.dumps({"global_step": 100}))
    finished = _dry_run(tmp_path, output_dir)
    assert finished.returncode == 0, finished.stderr
    assert all(line.split()[-1] == "--resume" for line in finished.stdout.splitlines() if line.startswith("node "))


# --------------------------------------------------------------------------- the accelerate configs


def _unknown_keys(config_file: Path) -> list[str]:
    """Return the keys of an accelerate config that accelerate 1.15 would not use.

    Top level: ``ClusterConfig.from_yaml_file`` (through ``load_config_from_file``) raises on unknown keys.
    Nested ``fsdp_config``/``deepspeed_config`` keys are not checked there: ``accelerate launch`` copies each
    onto its arguments (prefixing ``fsdp_`` where missing, commands/launch.py _validate_launch_command), so a
    misspelt one is silently ignored. Each must be one of the launch command's own options.
    """
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    config = load_config_from_file(str(config_file))
    options = {action.dest for action in launch_command_parser()._actions}
    unknown = []
    for section in ("fsdp_config", "deepspeed_config"):
        for key in getattr(config, section, None) or {}:
            name = "fsdp_" + key if section == "fsdp_config" and not key.startswith("fsdp") else key
            if name not in options:
                unknown.append(f"{section}.{key}")
    return unknown


@pytest.mark.parametrize("config_file", sorted(ACCELERATE_CONFIGS.glob("*.yaml")), ids=lambda path: path.name)
def test_accelerate_configs_use_only_keys_accelerate_knows(config_file):
    assert _unknown_keys(config_file) == []


def test_the_key_check_catches_a_misspelt_key(tmp_path):
    fsdp = (ACCELERATE_CONFIGS / "fsdp_8xa100.yaml").read_text()
    misspelt = tmp_path / "misspelt.yaml"
    misspelt.write_text(fsdp.replace("fsdp_reshard_after_forward:", "fsdp_reshard_after_foward:"))
    assert _unknown_keys(misspelt) == ["fsdp_config.fsdp_reshard_after_foward"]
    misspelt.write_text(fsdp.replace("same_network:", "same_netwrok:"))
    with pytest.raises(ValueError, match="unknown keys"):
        _unknown_keys(misspelt)


# --------------------------------------------------------------------------- DeepSpeed ZeRO-3


def test_zero3_config_says_the_model_is_partitioned_at_load():
    environment = _accelerate_environment(ACCELERATE_CONFIGS / "deepspeed_zero3_offload.yaml")
    assert environment["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"
    assert environment["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "true"


def test_pad_row_is_the_mean_on_zero3_partitioned_embeddings(tmp_path):
    """Under ZeRO-3 from_pretrained partitions the weights (each rank's ``weight`` is empty). The [PAD] row must
    still be the mean, and an embedding with spare rows (vocabulary padded past the tokenizer) must keep them:
    reading the partitioned shape (0,) made ensure_pad_token resize 49,160 rows down to 49,153. Inside
    loading_whole_weights, a load on one rank alone gets whole weights and the ZeRO-3 config comes back after."""
    pytest.importorskip("deepspeed")
    from transformers import LlamaConfig, LlamaForCausalLM

    from alpaca_nb.models import embedded_model_dir, load_tokenizer

    folder = tmp_path / "padded-vocabulary"
    config = LlamaConfig.from_pretrained(embedded_model_dir())
    config.update({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 49160, "tie_word_embeddings": False})
    LlamaForCausalLM(config).save_pretrained(folder)
    load_tokenizer().save_pretrained(folder)
    probe = textwrap.dedent(f"""
        import deepspeed, torch
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
        from alpaca_nb.models import load_model
        from alpaca_nb.sft import ensure_pad_token
        from alpaca_nb.train import TrainConfig, loading_whole_weights, training_arguments

        # As train() does: the arguments (and with them the DeepSpeed config) exist before the model loads.
        arguments = training_arguments(TrainConfig(output_dir={str(tmp_path / "out")!r}, global_batch_size=4,
                                                   per_device_batch_size=4), 1)
        model, tokenizer = load_model({str(folder)!r})
        tokenizer.pad_token = None  # LLaMA-1 has none
        weight = model.get_input_embeddings().weight
        print("partitioned", is_deepspeed_zero3_enabled(), tuple(weight.shape), tuple(weight.ds_shape))
        ensure_pad_token(model, tokenizer)
        for embedding in (model.get_input_embeddings(), model.get_output_embeddings()):
            with deepspeed.zero.GatheredParameters([embedding.weight]):
                full = embedding.weight.detach().clone()
            pad = tokenizer.pad_token_id
            print("rows", full.shape[0], "mean", torch.allclose(full[pad], full[:pad].mean(0), atol=1e-6))
        with loading_whole_weights():  # what rank 0 does alone when it merges a LoRA adapter
            whole, _ = load_model({str(folder)!r})
        print("whole", tuple(whole.get_input_embeddings().weight.shape), is_deepspeed_zero3_enabled())
    """)
    environment = _one_process({**_accelerate_environment(ACCELERATE_CONFIGS / "deepspeed_zero3_offload.yaml"),
                                "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")})
    finished = subprocess.run([sys.executable, "-c", probe], env=environment, capture_output=True, text=True,
                              timeout=300, cwd=ROOT)
    assert finished.returncode == 0, finished.stderr[-4000:]
    lines = [line for line in finished.stdout.splitlines() if line.startswith(("partitioned", "rows", "whole"))]
    assert lines == ["partitioned True (0,) (49160, 64)", "rows 49160 mean True", "rows 49160 mean True",
                     "whole (49160, 64) True"]


# --------------------------------------------------------------------------- GPUs without bf16


@pytest.mark.parametrize(("native_bf16", "precision", "lora_base"), [(True, "bf16", "bfloat16"),
                                                                      (False, "fp16", "float16")])
def test_gpus_before_ampere_train_in_fp16(tmp_path, monkeypatch, native_bf16, precision, lora_base):
    """V100 and T4 have no bf16 tensor cores, though torch.cuda.is_bf16_supported() says yes unless asked about
    emulation: such a GPU gets fp16 autocast (with loss scaling) and a float16 LoRA base."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or native_bf16)
    config = TrainConfig(output_dir=str(tmp_path), bf16=True)
    assert (uses_bf16(config), uses_fp16(config)) == (precision == "bf16", precision == "fp16")
    assert half_precision_dtype() == lora_base
    assert not uses_fp16(replace(config, bf16=False)) and not uses_bf16(replace(config, bf16=False))


# --------------------------------------------------------------------------- the run's length


def test_the_upstream_run_is_1221_optimizer_steps(tiny_llama, tmp_path):
    """The Trainer's own count for 52,002 examples, 3 epochs, global batch 128 (book/appendix_cluster.md): each
    epoch rounds up to 407 steps, the last on a partial batch, so 1,221 and not 52,002 × 3 / 128 = 1,218.8."""
    from transformers import AutoModelForCausalLM, Trainer

    from alpaca_nb.train import training_arguments, upstream_config

    arguments = training_arguments(upstream_config(str(tiny_llama), str(tmp_path)), processes=1)
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(tiny_llama), args=arguments,
                      train_dataset=[{"input_ids": [1], "labels": [1]}] * 52_002)
    counts = trainer.set_initial_training_values(arguments, trainer.get_train_dataloader())
    num_update_steps_per_epoch, max_steps = counts[1], counts[-1]
    assert (arguments.gradient_accumulation_steps, num_update_steps_per_epoch, max_steps) == (32, 407, 1221)
