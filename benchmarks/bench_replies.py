"""Benchmark chapter 5's reply generation: one instruction at a time against batched (left padding), same greedy settings.

Usage::

    .venv/bin/python benchmarks/bench_replies.py [--instructions 32] [--batch-size 16] [--max-new-tokens 128]
                                                 [--template chat|alpaca] [--goal 3.0]

What it measures: ``evaluate.generate_replies`` of the embedded SmolLM2-135M-Instruct on the first
``--instructions`` self-instruct user-oriented instructions, greedy, no cache, twice in this one run:
``batch_size=1`` (one prompt per ``generate`` call) and ``batch_size=--batch-size``. Printed: replies per
second of each, their ratio (PASS at ``--goal``, 3x), and how many replies have the same text both ways
(goal: at least 90 %). A batched reply can differ from its one-at-a-time twin: left padding changes the
shapes of the matrix products, so float sums round differently, and where two tokens are nearly tied
greedy decoding can then pick the other one; every differing pair is printed with where it diverges.
About 3 minutes on 2 idle cores with the defaults.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if not os.environ.get("ALPACA_NB_DATA_DIR") and (ROOT.parent / "shared" / "data" / "upstream").is_dir():
    os.environ["ALPACA_NB_DATA_DIR"] = str(ROOT.parent / "shared" / "data" / "upstream")
os.environ.setdefault("ALPACA_NB_PROGRESS", "0")


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instructions", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--template", choices=("chat", "alpaca"), default="chat")
    parser.add_argument("--goal", type=float, default=3.0, help="batched replies/s over one-at-a-time replies/s")
    return parser.parse_args(argv)


def first_difference(one: str, other: str) -> int:
    """Return the index of the first character where the two texts differ."""
    return next((index for index, (a, b) in enumerate(zip(one, other)) if a != b), min(len(one), len(other)))


def main(argv: list[str] | None = None) -> int:
    from alpaca_nb.data import load_eval_instructions
    from alpaca_nb.evaluate import generate_replies
    from alpaca_nb.models import load_model

    args = parse_arguments(argv)
    instructions = load_eval_instructions()[:args.instructions]
    model, tokenizer = load_model()
    timings, texts = {}, {}
    for batch_size in (1, args.batch_size):
        start = time.perf_counter()
        replies = generate_replies("embedded", instructions, template=args.template, model=model, tokenizer=tokenizer,
                                   max_new_tokens=args.max_new_tokens, batch_size=batch_size)
        timings[batch_size] = time.perf_counter() - start
        texts[batch_size] = [reply.output for reply in replies]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"{len(instructions)} user-oriented instructions, greedy, at most {args.max_new_tokens} new tokens, "
          f"{args.template} template")
    for batch_size, seconds in timings.items():
        print(f"batch size {batch_size:>3}: {seconds:7.1f} s, {len(instructions) / seconds:.3f} replies/s")
    ratio = timings[1] / timings[args.batch_size]
    same = sum(a == b for a, b in zip(texts[1], texts[args.batch_size]))
    print(f"batched / one at a time: {ratio:.2f}x ({'PASS' if ratio >= args.goal else 'FAIL'} against >= {args.goal}x)")
    share = same / len(instructions)
    print(f"same text both ways: {same} of {len(instructions)} ({share:.0%}; "
          f"{'PASS' if share >= 0.9 else 'FAIL'} against >= 90 %)")
    for index, (a, b) in enumerate(zip(texts[1], texts[args.batch_size])):
        if a != b:
            at = first_difference(a, b)
            print(f"  instruction {index}: diverges at character {at}: {a[max(0, at - 30):at + 30]!r} vs "
                  f"{b[max(0, at - 30):at + 30]!r}")
    return 0 if ratio >= args.goal and share >= 0.9 else 1


if __name__ == "__main__":
    raise SystemExit(main())
