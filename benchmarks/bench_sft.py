"""Benchmark the three batchings of alpaca_nb.batching on real training steps: padding costs compute, packing saves it.

Usage::

    .venv/bin/python benchmarks/bench_sft.py [--examples 64] [--batch-size 8] [--max-length 512] [--seed 0]
                                             [--rounds 2] [--packed-attention per-example|sdpa]

What it measures: training steps (forward, backward, AdamW step; bf16 autocast on CPU, float32 weights,
``use_cache=False``) of the embedded SmolLM2-135M-Instruct over the same real examples, drawn with
``random.Random(seed)`` from ``alpaca_gpt4_demo`` (GPT-4 outputs: longer, more varied than the davinci
ones) and tokenized by ``build_dataset`` at ``max_length``. The same examples go through three batchings,
``batch-size`` examples a step:

* ``upstream``: random batches, right-padded to the longest of the batch (stanford_alpaca's collator);
* ``grouped``: ``length_grouped_batches`` (similar lengths together), right-padded;
* ``packed``: the upstream random batches, packed with ``padding_free_collator`` (one row, no padding),
  attention computed per example by ``enable_packed_attention`` (``--packed-attention sdpa``: transformers'
  stock SDPA over the whole row with a block-diagonal mask, whose cost grows with the square of the row).

Every batch is trained once, timed. The batches are split into ``--rounds`` rounds; each round runs the
three batchings one after the other (order reversed every other round, so a machine that speeds up or slows
down mid-run favours none), each in a fresh process (so each peak memory is its own) that first takes one
warm-up step on the shortest examples, excluded. Printed per batching: effective (non-pad) tokens per
second of wall time (and of process CPU time, steadier on a shared machine), the non-pad share of the
tokens computed, peak resident memory (``ru_maxrss``) and its growth over the loaded model; then the
ratios against ``upstream``, measured in this same run, and PASS when packing reaches ``--goal`` (1.5x)
the upstream tokens per second. About 5 minutes on 2 idle cores with the defaults; ``--examples 16``
takes about a minute and a half. Other load on the machine makes every number noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Like tests/conftest.py: read the real files from ../shared/data/upstream when it exists.
if not os.environ.get("ALPACA_NB_DATA_DIR") and (ROOT.parent / "shared" / "data" / "upstream").is_dir():
    os.environ["ALPACA_NB_DATA_DIR"] = str(ROOT.parent / "shared" / "data" / "upstream")

BATCHINGS = ("upstream", "grouped", "packed")


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=64, help="real examples trained on, each once per batching")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per training step")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the three batchings")
    parser.add_argument("--packed-attention", choices=("per-example", "sdpa"), default="per-example",
                        help="attention for the packed row: enable_packed_attention, or stock SDPA with a mask")
    parser.add_argument("--goal", type=float, default=1.5, help="packed / upstream tokens per second needed to PASS")
    parser.add_argument("--worker", choices=BATCHINGS, help=argparse.SUPPRESS)  # one batching, in this process
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def peak_rss_mib() -> float:
    """Return this process's peak resident memory in MiB (ru_maxrss counts KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if platform.system() == "Darwin" else peak / 2**10


def real_examples(args: argparse.Namespace, tokenizer) -> list[dict]:
    """Return the tokenized benchmark examples: a seeded sample of alpaca_gpt4_demo."""
    from alpaca_nb.data import load_alpaca_data
    from alpaca_nb.sft import build_dataset

    records = load_alpaca_data(asset="alpaca_gpt4_demo")
    chosen = random.Random(args.seed).sample(records, args.examples)
    examples, _ = build_dataset(chosen, tokenizer, max_length=args.max_length)
    return examples


def batches_for(batching: str, examples: list[dict], args: argparse.Namespace) -> list[list[int]]:
    """Return the index batches of one batching; packed uses upstream's random batches, unpadded."""
    from alpaca_nb.batching import length_grouped_batches, random_batches

    if batching == "grouped":
        return length_grouped_batches([len(e["input_ids"]) for e in examples], args.batch_size, seed=args.seed)
    return random_batches(len(examples), args.batch_size, seed=args.seed)


def cpu_seconds() -> float:
    """Return the CPU time (user + system) this process has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_worker(args: argparse.Namespace) -> dict:
    """Return the measurements of one batching over this round's batches, trained in this process."""
    import torch

    from alpaca_nb.models import load_model
    from alpaca_nb.batching import AlpacaCollator, enable_packed_attention, padding_free_collator
    from alpaca_nb.train import bf16_is_fast

    torch.manual_seed(args.seed)
    model, tokenizer = load_model()
    model.train()
    model.config.use_cache = False  # packed rows are only isolated from each other without a cache
    if args.worker == "packed" and args.packed_attention == "per-example":
        enable_packed_attention(model)
    examples = real_examples(args, tokenizer)
    collate = padding_free_collator() if args.worker == "packed" else AlpacaCollator(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.0)  # upstream's lr and decay
    memory_before_training = peak_rss_mib()

    def train_step(batch_indices: list[int]) -> int:
        batch = collate([examples[i] for i in batch_indices])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_is_fast()):  # as train(): emulated bf16 is slow
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return batch["input_ids"].numel()

    shortest = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))[:args.batch_size]
    train_step(shortest)  # warm-up: optimizer state allocation and kernel set-up, excluded
    batches = batches_for(args.worker, examples, args)[args.round::args.rounds]
    computed_tokens = 0
    started, cpu_started = time.perf_counter(), cpu_seconds()
    for batch_indices in batches:
        computed_tokens += train_step(batch_indices)
    return {
        "steps": len(batches), "seconds": time.perf_counter() - started, "cpu_seconds": cpu_seconds() - cpu_started,
        "real_tokens": sum(len(examples[i]["input_ids"]) for batch in batches for i in batch),
        "computed_tokens": computed_tokens, "peak_rss_mib": peak_rss_mib(),
        "training_rss_growth_mib": peak_rss_mib() - memory_before_training,
    }


def measure(batching: str, round_number: int, args: argparse.Namespace) -> dict:
    """Return one batching's measurements for one round from a fresh Python process (its own peak memory)."""
    command = [sys.executable, __file__, "--worker", batching, "--round", str(round_number),
               "--rounds", str(args.rounds), "--examples", str(args.examples), "--batch-size", str(args.batch_size),
               "--max-length", str(args.max_length), "--seed", str(args.seed),
               "--packed-attention", args.packed_attention]
    environment = {**os.environ, "TQDM_DISABLE": "1"}
    finished = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    if finished.returncode != 0:
        raise SystemExit(f"the {batching} worker failed:\n{finished.stderr[-4000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def combine(rounds: list[dict]) -> dict:
    """Return one batching's totals over its rounds: summed tokens and times, the largest peak memory."""
    summed = ("steps", "seconds", "cpu_seconds", "real_tokens", "computed_tokens")
    total = {key: sum(r[key] for r in rounds) for key in summed}
    total["tokens_per_second"] = total["real_tokens"] / total["seconds"]
    total["tokens_per_cpu_second"] = total["real_tokens"] / total["cpu_seconds"]
    total["non_pad_share"] = total["real_tokens"] / total["computed_tokens"]
    total["peak_rss_mib"] = max(r["peak_rss_mib"] for r in rounds)
    total["training_rss_growth_mib"] = max(r["training_rss_growth_mib"] for r in rounds)
    return total


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return 0
    import torch

    from alpaca_nb.train import bf16_is_fast

    print(f"settings: {args.examples} alpaca_gpt4_demo examples (seed {args.seed}), {args.batch_size} a step, "
          f"max_length {args.max_length}, {args.rounds} rounds, packed attention {args.packed_attention}; "
          f"embedded SmolLM2-135M-Instruct, {'bf16 autocast' if bf16_is_fast() else 'float32'}, AdamW lr 2e-5; "
          f"torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start", flush=True)
    measured: dict[str, list[dict]] = {batching: [] for batching in BATCHINGS}
    for round_number in range(args.rounds):
        order = BATCHINGS if round_number % 2 == 0 else BATCHINGS[::-1]
        for batching in order:
            measured[batching].append(measure(batching, round_number, args))
            r = measured[batching][-1]
            print(f"  round {round_number + 1}/{args.rounds} {batching:>8}: {r['steps']} steps in "
                  f"{r['seconds']:6.1f} s, "
                  f"{r['real_tokens'] / r['seconds']:6.1f} non-pad tokens/s, load average {os.getloadavg()[0]:.1f}",
                  flush=True)
    results = {batching: combine(rounds) for batching, rounds in measured.items()}
    for batching, r in results.items():
        print(f"{batching:>8}: {r['tokens_per_second']:7.1f} non-pad tokens/s "
              f"({r['tokens_per_cpu_second']:6.1f} per CPU-s)  "
              f"non-pad share {r['non_pad_share']:6.1%}  peak RSS {r['peak_rss_mib']:6.0f} MiB "
              f"(+{r['training_rss_growth_mib']:.0f} training)  {r['steps']} steps in {r['seconds']:.1f} s, "
              f"{r['real_tokens']} real / {r['computed_tokens']} computed tokens")
    baseline = results["upstream"]
    for batching in ("grouped", "packed"):
        r = results[batching]
        print(f"{batching} vs upstream: {r['tokens_per_second'] / baseline['tokens_per_second']:.2f}x tokens/s "
              f"({r['tokens_per_cpu_second'] / baseline['tokens_per_cpu_second']:.2f}x per CPU-s), "
              f"{r['peak_rss_mib'] / baseline['peak_rss_mib']:.2f}x peak RSS, "
              f"{r['training_rss_growth_mib'] / baseline['training_rss_growth_mib']:.2f}x training memory growth")
    speedup = results["packed"]["tokens_per_second"] / baseline["tokens_per_second"]
    verdict = "PASS" if speedup >= args.goal else "FAIL"
    print(f"{verdict}: padding-free packing {speedup:.2f}x upstream-style tokens/s (goal >= {args.goal}x); "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    raise SystemExit(main())
