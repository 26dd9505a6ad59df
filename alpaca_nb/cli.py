"""The ``alpaca-nb`` command: set-up and inspection of the data and the embedded model."""

from __future__ import annotations

import argparse
import sys
import time

from alpaca_nb.data import ASSETS, DataError, resolve

__all__ = ["main"]


def _prepare(args: argparse.Namespace) -> int:
    """Convert the embedded model once and resolve the data the profile needs; report where each is."""
    from alpaca_nb.models import embedded_model_dir
    from alpaca_nb.profiles import current_profile

    profile = current_profile()
    needed = ["seed_tasks", "prompt", "eval_instructions", profile.alpaca_asset, *args.asset]
    failures = 0
    for name in dict.fromkeys(needed):
        try:
            print(f"{name:18s} {resolve(name)}")
        except DataError as error:
            failures += 1
            print(f"{name:18s} MISSING: {error}", file=sys.stderr)
    if failures:
        return 1  # before the model conversion: the data is what the user must fix first
    started = time.perf_counter()
    print(f"{'embedded model':18s} {embedded_model_dir()} ({time.perf_counter() - started:.1f} s)")
    return 0


def _assets(_args: argparse.Namespace) -> int:
    for asset in ASSETS.values():
        print(f"{asset.name:18s} {asset.records or '-':>6} records  {asset.licence}\n{'':18s} {asset.url}")
    return 0


def _reply(args: argparse.Namespace) -> int:
    from alpaca_nb.models import generate_reply, load_model

    model, tokenizer = load_model(args.model)
    print(generate_reply(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, seed=args.seed))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``alpaca-nb`` command."""
    parser = argparse.ArgumentParser(prog="alpaca-nb", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="convert the embedded model and locate (or download) the data")
    prepare.add_argument("--asset", action="append", default=[], choices=sorted(ASSETS), help="also fetch this asset")
    prepare.set_defaults(run=_prepare)
    commands.add_parser("assets", help="list the pinned upstream files").set_defaults(run=_assets)
    reply = commands.add_parser("reply", help="answer one prompt with a model (default: the embedded one)")
    reply.add_argument("prompt")
    reply.add_argument("--model", default=None, help="Hugging Face id or local path (default: embedded SmolLM2)")
    reply.add_argument("--max-new-tokens", type=int, default=128)
    reply.add_argument("--temperature", type=float, default=0.0)
    reply.add_argument("--seed", type=int, default=0)
    reply.set_defaults(run=_reply)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``alpaca-nb`` command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except DataError as error:
        print(f"alpaca-nb: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
