#!/usr/bin/env bash
# The GPU check (issue 34, part 5): the upstream recipe's launch path on one GPU, in minutes, with no internet.
#
#   bash benchmarks/gpu_check.sh                    # on the GPU machine, from the repository root
#   GPU_CHECK_CPU=1 bash benchmarks/gpu_check.sh    # a toy of the same path on a CPU (about a minute here)
#   bash benchmarks/gpu_check.sh --fetch-wheels     # here, once: the pure-Python wheels the GPU image lacks
#
# It runs with the machine's own Python (python3, or $PYTHON) and the project's source on PYTHONPATH, nothing
# installed: benchmarks/gpu_check.py builds a LLaMA-7B-shaped Llama cut to a few layers from its config (no
# download) with synthetic Alpaca-format data, then
#   1. the upstream preset (full fine-tune, global batch 128, bf16) through `accelerate launch` with
#      configs/accelerate/fsdp_8xa100.yaml adapted to one process, for GPU_CHECK_STEPS steps, saving the final
#      model through the FSDP path;
#   2. a LoRA run of the same model (configs/accelerate/single_gpu_lora.yaml, bf16 base), GPU_CHECK_LORA_STEPS;
# and prints tokens/s, peak memory (torch.cuda.max_memory_allocated) and MFU for each, ending "gpu check: ok".
# Both runs go through `benchmarks/gpu_check.py train`, which is `python -m alpaca_nb.train` plus a record of
# the process's peak memory.
#
# The GPU image (torch 2.11, transformers 5.17, accelerate 1.15, peft) has every package alpaca_nb's training
# path imports (torch, transformers, accelerate, peft, tokenizers, safetensors, httpx, tqdm, pandas, psutil,
# yaml), but transformers 5.17's TrainingArguments has no `activation_checkpointing` (added in 5.2x; the
# project is tested on 5.24), which alpaca_nb.train passes: --fetch-wheels downloads transformers 5.24.0
# (pure Python; its needs, huggingface-hub >= 1.31 and tokenizers 0.23, are on the image) and peft 0.21.2
# into .whl/ (in .gitignore). Carry it (the device tool's `carry: [".whl"]`): the script installs what is in
# .whl/ into a temporary folder ahead of the image's packages.
#
# Sizes (environment): GPU_CHECK_LAYERS (4), GPU_CHECK_TOKENS per example (256), GPU_CHECK_STEPS (30),
# GPU_CHECK_LORA_STEPS (10), GPU_CHECK_GLOBAL_BATCH (128, the recipe's). The defaults (1.07B parameters,
# ~20 GB of GPU memory) take about 3 minutes on an H200, well inside the 8 allowed. Logs and a summary go to
# $OUT when it is set (the device tool's output folder), else to the work folder, which is kept.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$PWD
PYTHON=${PYTHON:-python3}
WHEELS=(transformers==5.24.0 peft==0.21.2)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    mkdir -p .whl
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        -d .whl "${WHEELS[@]}"
    ls -l .whl
    exit 0
fi

started=$SECONDS
cpu=${GPU_CHECK_CPU:-0}
if [[ "$cpu" == 1 ]]; then
    steps=${GPU_CHECK_STEPS:-3}; lora_steps=${GPU_CHECK_LORA_STEPS:-3}; batch=${GPU_CHECK_GLOBAL_BATCH:-8}
    build_flags=(--cpu)
else
    steps=${GPU_CHECK_STEPS:-30}; lora_steps=${GPU_CHECK_LORA_STEPS:-10}; batch=${GPU_CHECK_GLOBAL_BATCH:-128}
    build_flags=()
fi
export GPU_CHECK_STEPS=$steps GPU_CHECK_LORA_STEPS=$lora_steps GPU_CHECK_GLOBAL_BATCH=$batch

work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
logs=${OUT:-$work}
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G "$repo/.whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" "$repo"/.whl/*.whl
    export PYTHONPATH="$repo:$work/site${PYTHONPATH#$repo}"
fi
# Offline, and quiet where the image's libraries would print a line per step or reach for the network.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 ALPACA_NB_OFFLINE=1 ALPACA_NB_PROGRESS=0 PYTHONUNBUFFERED=1
export HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false

echo "gpu check: $("$PYTHON" -c 'import sys, torch, transformers, accelerate, peft
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (CPU toy)"
print(f"{gpu}; python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"accelerate {accelerate.__version__}, peft {peft.__version__}")'); work folder $work"
"$PYTHON" benchmarks/gpu_check.py build "$work" "${build_flags[@]}"
echo "model built after $((SECONDS - started)) s"

common=(--preset upstream --model "$work/model" --data "$work/data.json" --global-batch-size "$batch"
        --save-steps 100000 --logging-steps 1)
GPU_CHECK_MEMORY=$work/fsdp_memory.json "$PYTHON" -m accelerate.commands.launch --config_file "$work/fsdp_1proc.yaml" \
    benchmarks/gpu_check.py train "${common[@]}" --output-dir "$work/fsdp" --max-steps "$steps" \
    > "$logs/fsdp.log" 2>&1 || echo "the FSDP run failed (exit $?): $logs/fsdp.log"
grep -E "FSDP units|FSDP wraps no|asks for FSDP" "$logs/fsdp.log" || true
tail -n 1 "$logs/fsdp.log"
echo "FSDP run done after $((SECONDS - started)) s"
GPU_CHECK_MEMORY=$work/lora_memory.json "$PYTHON" -m accelerate.commands.launch --config_file "$work/lora.yaml" \
    benchmarks/gpu_check.py train "${common[@]}" --output-dir "$work/lora" --max-steps "$lora_steps" --lora \
    --model-dtype bfloat16 --no-save-final-model > "$logs/lora.log" 2>&1 || echo "the LoRA run failed (exit $?): $logs/lora.log"
tail -n 1 "$logs/lora.log"
echo "LoRA run done after $((SECONDS - started)) s"

status=0
"$PYTHON" benchmarks/gpu_check.py report "$work" | tee "$logs/gpu_check_summary.txt" || status=$?
if [[ "$cpu" != 1 ]] && ! grep -q "FSDP units: .*DecoderLayer" "$logs/fsdp.log"; then
    # On a GPU, accelerate must shard per decoder layer (stanford_alpaca#58: a wrong class name wraps nothing).
    echo "gpu check: FAILED: no 'FSDP units: ... DecoderLayer' line in $logs/fsdp.log" | tee -a "$logs/gpu_check_summary.txt"
    status=1
fi
echo "gpu check took $((SECONDS - started)) s"
exit "$status"
