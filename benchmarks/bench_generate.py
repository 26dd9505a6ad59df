"""How much does client-side concurrency speed up self-instruct generation on the embedded server?

What is measured
----------------
The embedded model is served by llama.cpp's own ``llama-server`` (``alpaca_nb.llm.local_server``,
parallel slots with continuous batching, the profile's ``server_parallel`` and ``server_context``).
``alpaca_nb.selfinstruct.generate`` runs with a huge ``num_instructions`` and ``max_requests=N``, so
that the request limit stops it, each time in a fresh temporary folder with the same seed (the same
prompts: upstream prompt.txt + 3 seed tasks, the completions API, temperature 1.0), once at
concurrency 1 and once at concurrency 8, in two configurations, both in this one run:

1. **no added latency**, ``max_tokens`` 256: the server's own throughput. Goal: requests/s at
   concurrency 8 >= 2x concurrency 1. Completion tokens/s are printed for both.
   Every slot is warmed first with the shared prompt.txt prefix, as it is during a long run.
2. **2 s added latency** per request (``tests/faultproxy.FaultProxy``, as a remote API would add),
   ``max_tokens`` 8: the latency should overlap. Goal: >= 0.8 x 8 = 6.4x.

Baseline: llama-cpp-python's own server (serial), which this project used before, is no longer
installed. Its figures, measured on the same kind of machine with the same GGUF, flags and prompts
(issue "Step 1 of 5"), are printed for reference and labelled as not measured in this run: 13
completion tokens/s sequentially and 12 at concurrency 8; with 2 s latency, 1.75x at concurrency 8.

How to run
----------
    .venv/bin/python benchmarks/bench_generate.py            # both configurations, about 5 minutes on 2 cores
    .venv/bin/python benchmarks/bench_generate.py --requests 16 --max-tokens 256 --latency-requests 24

The exit code is 0 whatever the verdict (a measurement, not a test), 1 if a run itself failed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if not os.environ.get("ALPACA_NB_DATA_DIR"):
    os.environ["ALPACA_NB_DATA_DIR"] = str((REPO.parent / "shared" / "data" / "upstream").resolve())
sys.path.insert(0, str(REPO / "tests"))  # FaultProxy lives with the tests

from faultproxy import FaultProxy  # noqa: E402

from alpaca_nb.costs import count_tokens  # noqa: E402
from alpaca_nb.data import load_seed_tasks  # noqa: E402
from alpaca_nb.llm import CallRecord, Endpoint, local_server, server_build_info  # noqa: E402
from alpaca_nb.profiles import current_profile  # noqa: E402
from alpaca_nb.selfinstruct import SamplingSettings, encode_prompt, generate  # noqa: E402

OLD_SERVER = "llama-cpp-python 0.3.36 server (serial), from the issue, not measured in this run"


@dataclass(frozen=True)
class RunResult:
    concurrency: int
    requests: int
    failed: int
    completion_tokens: int
    wall_s: float

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.wall_s

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.wall_s


def run_generate(base_url: str, model: str, concurrency: int, requests: int, max_tokens: int, seed_tasks: list,
                 seed: int) -> RunResult:
    """One generate() call in a fresh folder, timed whole."""
    records: list[CallRecord] = []
    endpoint = Endpoint(base_url, model, api="completions", timeout=600, on_call=records.append)
    with tempfile.TemporaryDirectory(prefix=f"bench-generate-c{concurrency}-") as out_dir:
        started = time.perf_counter()
        report = generate(endpoint, num_instructions=10**9, out_dir=out_dir, concurrency=concurrency, seed=seed,
                          seed_tasks=seed_tasks, sampling=SamplingSettings(max_tokens=max_tokens),
                          max_requests=requests, progress=False)
        wall = time.perf_counter() - started
    tokens = sum(record.completion_tokens for record in records if record.outcome == "ok")
    return RunResult(concurrency, report.requests, report.failed_requests, tokens, wall)


def warm_up_slots(base_url: str, model: str, slots: int, seed_tasks: list) -> None:
    """Put prompt.txt, the prefix every request shares, in every slot's KV cache, as in a long run.

    Each slot caches its own last prompt; without this, the concurrency-8 run alone would pay for
    evaluating the shared prefix once per slot, while the concurrency-1 run reuses one warm slot.
    """
    endpoint = Endpoint(base_url, model, api="completions", timeout=600)

    async def all_slots() -> None:
        prompts = [encode_prompt(seed_tasks[3 * slot:3 * slot + 3]) for slot in range(slots)]
        await asyncio.gather(*(endpoint.acomplete(prompt, max_tokens=1) for prompt in prompts))

    asyncio.run(all_slots())


def compare(label: str, base_url: str, model: str, args: argparse.Namespace, requests: int, max_tokens: int,
            goal: float, seed_tasks: list) -> bool:
    """Run concurrency 1 then ``args.concurrency``; print both and the verdict; False if a run failed."""
    print(f"\n=== {label}: {requests} requests, max_tokens {max_tokens} ===")
    results = [run_generate(base_url, model, level, requests, max_tokens, seed_tasks, args.seed)
               for level in (1, args.concurrency)]
    for result in results:
        print(f"concurrency {result.concurrency:>2}: {result.requests} requests in {result.wall_s:6.1f} s -> "
              f"{result.requests_per_s:.3f} requests/s, {result.tokens_per_s:5.1f} completion tokens/s "
              f"({result.completion_tokens} tokens; failed {result.failed})")
    serial, parallel = results
    ok = serial.requests == parallel.requests == requests and not serial.failed and not parallel.failed
    ratio = parallel.requests_per_s / serial.requests_per_s
    verdict = "PASS" if ok and ratio >= goal else "FAIL"
    print(f"speed-up in requests/s: {ratio:.2f}x (tokens/s: {parallel.tokens_per_s / serial.tokens_per_s:.2f}x)   "
          f"goal >= {goal:.1f}x   {verdict}" + ("" if ok else "   (a run did not finish all its requests)"))
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=16, help="requests per run without added latency")
    parser.add_argument("--max-tokens", type=int, default=256, help="max_tokens without added latency")
    parser.add_argument("--latency", type=float, default=2.0, help="seconds the proxy adds to every request")
    parser.add_argument("--latency-requests", type=int, default=24, help="requests per run with added latency")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    seed_tasks = load_seed_tasks()
    started = time.perf_counter()
    with local_server() as server:
        flags = server_build_info().get("cmake_flags", "unknown flags")
        print(f"bench_generate: {server.model} on llama-server ({flags}); {os.cpu_count()} CPUs, "
              f"1-min load {os.getloadavg()[0]:.2f}")
        count_tokens("warm up the tokenizer", server.model)
        warm_up_slots(server.base_url, server.model, current_profile().server_parallel, seed_tasks)
        ok = compare("no added latency", server.base_url, server.model, args, args.requests, args.max_tokens,
                     2.0, seed_tasks)
        with FaultProxy(server.base_url, added_latency_s=args.latency) as proxy:
            ok &= compare(f"{args.latency:g} s added latency", proxy.base_url, server.model, args,
                          args.latency_requests, 8, 0.8 * args.concurrency, seed_tasks)
    print(f"\nbaseline, {OLD_SERVER}: 13 completion tokens/s at concurrency 1, 12 at concurrency 8; "
          "1.75x requests/s with 2 s latency")
    print(f"total time {time.perf_counter() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
