"""How much does client-side concurrency speed up self-instruct generation against a remote-like API?

What is measured
----------------
The embedded llama.cpp server (``alpaca_nb.llm.local_server``) is started once and put behind
``tests/faultproxy.FaultProxy`` with ``added_latency_s`` (default 2.0 s), so that every request pays
a fixed network latency, as a call to a remote API would. ``alpaca_nb.selfinstruct.generate`` then
runs twice against the proxy, each time in a fresh temporary output folder, with the same seed (so
the same prompts), the completions API, small completions (``max_tokens``, default 8, so that the
latency rather than decoding dominates), a huge ``num_instructions`` and ``max_requests=N``
(default 24), so that the request limit is what stops the run: once with concurrency 1 and once
with concurrency 8. Throughput is finished requests / wall time of the ``generate()`` call, and the
script prints the ratio (concurrency 8 over concurrency 1) against the goal 0.8 x 8 = 6.4.

The llama.cpp server answers one request at a time, so its own work per request (evaluating the
~700-token prompt plus a few tokens) is serial however many requests are in flight. The script
measures it with direct calls (no proxy) on the same prompts, and uses it to explain the ratio:
with latency L and serial server time s per request, no concurrency can finish more than one
request every s seconds, so the speed-up is capped near (L + s) / s (Amdahl's law), and a finite
run of N requests also pays for filling and draining the pipeline (a small simulation of the run
with the measured L and s gives the expected ratio).

``--prompt short`` (or ``both``) runs a second, clearly labelled configuration: the same benchmark
with ``template=""`` (the prompt without upstream's prompt.txt, only the numbered seed tasks). It
saves less server time than its token count suggests: llama.cpp keeps the previous prompt in its KV
cache and re-evaluates only what follows the common prefix, and prompt.txt is that common prefix.

How to run
----------
    .venv/bin/python benchmarks/bench_generate.py                      # defaults: ~3-4 minutes on 2 cores
    .venv/bin/python benchmarks/bench_generate.py --latency 2 --requests 24 --max-tokens 8 --concurrency 8
    .venv/bin/python benchmarks/bench_generate.py --prompt short       # the prompt without prompt.txt
    .venv/bin/python benchmarks/bench_generate.py --prompt both        # both configurations, ~7 minutes

The seed tasks and prompt.txt are read through ``$ALPACA_NB_DATA_DIR``, which defaults here to
``../shared/data/upstream`` relative to the repository root. The exit code is 0 whatever the
verdict (this is a measurement, not a test), 1 if a run itself failed.
"""

from __future__ import annotations

import argparse
import heapq
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The package reads the seed tasks and prompt.txt through ALPACA_NB_DATA_DIR (set before importing it).
if not os.environ.get("ALPACA_NB_DATA_DIR"):
    os.environ["ALPACA_NB_DATA_DIR"] = str((REPO.parent / "shared" / "data" / "upstream").resolve())
# FaultProxy lives with the tests (tests/faultproxy.py), not in the package: import it from there.
sys.path.insert(0, str(REPO / "tests"))

from faultproxy import FaultProxy  # noqa: E402

from alpaca_nb.costs import count_tokens  # noqa: E402
from alpaca_nb.data import load_seed_tasks  # noqa: E402
from alpaca_nb.llm import CallRecord, Endpoint, local_server  # noqa: E402
from alpaca_nb.selfinstruct import SamplingSettings, encode_prompt, generate  # noqa: E402

GOAL_FRACTION = 0.8  # the goal is a speed-up of at least 0.8 x the concurrency


@dataclass
class RunResult:
    concurrency: int
    requests: int
    failed: int
    retries: int
    wall_s: float
    call_latencies: list[float]
    stopped_reason: str

    @property
    def throughput(self) -> float:
        return self.requests / self.wall_s if self.wall_s > 0 else 0.0


def run_generate(base_url: str, model: str, concurrency: int, args: argparse.Namespace, seed_tasks: list,
                 template: str | None) -> RunResult:
    """One generate() call through the proxy, in a fresh output folder; times the whole call."""
    records: list[CallRecord] = []
    endpoint = Endpoint(base_url, model, api="completions", timeout=600, on_call=records.append)
    with tempfile.TemporaryDirectory(prefix=f"bench-generate-c{concurrency}-") as out_dir:
        started = time.perf_counter()
        report = generate(endpoint, num_instructions=10**9, out_dir=out_dir, concurrency=concurrency,
                          seed=args.seed, seed_tasks=seed_tasks, template=template,
                          sampling=SamplingSettings(max_tokens=args.max_tokens), max_requests=args.requests,
                          progress=False)
        wall = time.perf_counter() - started
    return RunResult(concurrency=concurrency, requests=report.requests, failed=report.failed_requests,
                     retries=sum(record.outcome == "retry" for record in records), wall_s=wall,
                     call_latencies=[record.latency_s for record in records if record.outcome == "ok"],
                     stopped_reason=report.stopped_reason)


def direct_server_time(base_url: str, model: str, args: argparse.Namespace, seed_tasks: list,
                       template: str | None) -> tuple[list[float], list[int]]:
    """Latencies and prompt tokens of direct calls (no proxy) on the first prompts the runs will send.

    The prompts are built as generate() builds them (same seed tasks for request i, same per-request
    sampling seed), after one warm-up call that also puts the shared prompt prefix in llama.cpp's cache.
    """
    endpoint = Endpoint(base_url, model, api="completions", timeout=600)
    sampling = SamplingSettings(max_tokens=args.max_tokens)

    def prompt(request: int) -> str:
        examples = random.Random(f"{args.seed}-{request}").sample(seed_tasks, sampling.num_prompt_instructions)
        return encode_prompt(examples, template)

    endpoint.complete(prompt(args.requests), seed=0, **sampling.request_args())  # warm-up, not counted
    latencies, prompt_tokens = [], []
    for request in range(args.direct_calls):
        started = time.perf_counter()
        completion = endpoint.complete(prompt(request), seed=args.seed * 1_000_003 + request, **sampling.request_args())
        latencies.append(time.perf_counter() - started)
        prompt_tokens.append(completion.prompt_tokens)
    return latencies, prompt_tokens


def simulated_makespan(requests: int, concurrency: int, latency_s: float, server_s: float) -> float:
    """Wall time of ``requests`` jobs, ``concurrency`` at a time, each a fixed delay then a FIFO single server.

    The model of this benchmark: the proxy delays every request by ``latency_s`` in parallel, then the
    llama.cpp server works ``server_s`` on it, one request at a time; a finished request frees its slot.
    """
    arrivals = [latency_s] * min(concurrency, requests)  # when each in-flight request reaches the server
    started, server_free, end = len(arrivals), 0.0, 0.0
    while arrivals:
        arrival = heapq.heappop(arrivals)
        end = server_free = max(arrival, server_free) + server_s
        if started < requests:
            heapq.heappush(arrivals, end + latency_s)
            started += 1
    return end


def benchmark(label: str, server, args: argparse.Namespace, seed_tasks: list, template: str | None) -> bool:
    """Run one configuration and print its table and verdict; returns False if a run failed."""
    latency, concurrency, requests = args.latency, args.concurrency, args.requests
    print(f"\n=== configuration: {label} ===")
    direct, prompt_tokens = direct_server_time(server.base_url, server.model, args, seed_tasks, template)
    server_s = statistics.mean(direct)
    print(f"server work per request, direct calls without the proxy (mean of {len(direct)} after 1 warm-up): "
          f"{server_s:.3f} s  (min {min(direct):.3f}, max {max(direct):.3f}; "
          f"prompt tokens mean {statistics.mean(prompt_tokens):.0f}, completion <= {args.max_tokens})")

    results = []
    with FaultProxy(server.base_url, added_latency_s=latency) as proxy:
        for level in (1, concurrency):
            result = run_generate(proxy.base_url, server.model, level, args, seed_tasks, template)
            results.append(result)
            mean_call = statistics.mean(result.call_latencies) if result.call_latencies else float("nan")
            print(f"concurrency {level:>2}: {result.requests} requests in {result.wall_s:7.2f} s -> "
                  f"{result.throughput:.3f} requests/s  (mean call latency {mean_call:.2f} s; "
                  f"failed {result.failed}, retried attempts {result.retries}; {result.stopped_reason})")
    serial, parallel = results
    if serial.requests != requests or parallel.requests != requests or serial.failed or parallel.failed:
        print(f"RUN FAILED: expected {requests} successful requests in each run; the ratio below is not comparable")
        ok = False
    else:
        ok = True

    goal = GOAL_FRACTION * concurrency
    ratio = parallel.throughput / serial.throughput if serial.throughput > 0 else 0.0
    verdict = "PASS" if ok and ratio >= goal else "FAIL"
    print(f"speed-up (requests/s at concurrency {concurrency} / at concurrency 1): {ratio:.2f}x   "
          f"goal >= {goal:.1f}x ({GOAL_FRACTION} x {concurrency})   {verdict}")

    # Three estimates of the serial time s per request (the server's own work, one request at a time):
    # direct calls (asked for explicitly), the concurrency-1 run's call latency minus L (the very same
    # prompts, through the proxy), and the concurrency-8 run's wall time per request (that run is
    # server-bound, so s is at most this). They differ when other processes compete for the CPUs.
    in_run_s = (statistics.mean(serial.call_latencies) - latency) if serial.call_latencies else float("nan")
    per_request_c8 = parallel.wall_s / parallel.requests if parallel.requests else float("nan")
    per_request_c1 = serial.wall_s / serial.requests if serial.requests else float("nan")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"server time per request s (serial): direct calls {server_s:.3f} s; inside the concurrency-1 run "
          f"(call latency - L) {in_run_s:.3f} s; concurrency-{concurrency} run, wall time per request "
          f"{per_request_c8:.3f} s (an upper bound on s when the server is the bottleneck); "
          f"1-min load average now {load:.2f} on {os.cpu_count()} CPUs")
    estimates = [("direct s", server_s)] + ([("in-run s", in_run_s)] if in_run_s > 0 else [])
    model = "; ".join(
        f"{name} {s:.3f} s: ceiling min({concurrency}, (L+s)/s) = {min(concurrency, (latency + s) / s):.2f}x, "
        f"simulated {requests}-request run {simulated_makespan(requests, 1, latency, s) / simulated_makespan(requests, concurrency, latency, s):.2f}x"
        for name, s in estimates)
    print(f"model (latency L = {latency:g} s overlaps across requests, s does not): {model}")
    print(f"measured ratio = (wall per request at concurrency 1) / (wall per request at concurrency {concurrency}) "
          f"= {per_request_c1:.3f} s / {per_request_c8:.3f} s = {ratio:.2f}x, where {per_request_c1:.3f} s "
          f"~ L {latency:g} s + s {in_run_s:.3f} s")
    if verdict == "FAIL" and ok:
        measured_s = [s for _, s in estimates] + [per_request_c8]
        s_low, s_high = min(measured_s), max(measured_s)
        bound = lambda s: min(concurrency, (latency + s) / s)  # noqa: E731
        needed_s = latency / (goal - 1)
        print(f"why it falls short (Amdahl): at concurrency 1 each request costs L + s = {per_request_c1:.2f} s "
              f"of wall time; at concurrency {concurrency} the latency L overlaps across requests, but the "
              "llama.cpp server still evaluates one prompt at a time, so each request still costs about s of "
              f"wall time ({per_request_c8:.2f} s measured). The speed-up is thus bounded by (L+s)/s: "
              f"{bound(s_high):.2f}x-{bound(s_low):.2f}x for s between {s_low:.2f} s and {s_high:.2f} s (the "
              f"estimates above), far below {goal:.1f}x. "
              + (f"With L = {latency:g} s, {goal:.1f}x needs s <= L/({goal:.1f}-1) = {needed_s:.3f} s, "
                 f"{s_low / needed_s:.1f}x less server work per request than the smallest s measured; with this "
                 f"server it needs L >= s x ({goal:.1f}-1) = {s_low * (goal - 1):.1f} s or more. "
                 if latency > 0 else "With L = 0 there is no latency to overlap at all. ")
              + "A remote API serves concurrent requests in parallel, so there the serial part is small and the "
              "speed-up approaches the concurrency.")
        if in_run_s > 0 and ratio > 1.05 * bound(in_run_s):
            print(f"note: the measured {ratio:.2f}x is above (L+s)/s = {bound(in_run_s):.2f}x for the "
                  f"concurrency-1 run's own s ({in_run_s:.2f} s) because s was smaller during the concurrency-"
                  f"{concurrency} run ({per_request_c8:.2f} s per request); s varies from call to call (direct "
                  f"calls {min(direct):.2f}-{max(direct):.2f} s) as other processes share these "
                  f"{os.cpu_count()} CPUs.")
    elif verdict == "FAIL":
        print("why it falls short: a run did not complete all its requests (see above); fix that first.")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--latency", type=float, default=2.0, help="seconds the proxy adds to every request")
    parser.add_argument("--requests", type=int, default=24, help="max_requests of each generate() run")
    parser.add_argument("--concurrency", type=int, default=8, help="the concurrency compared with 1")
    parser.add_argument("--max-tokens", type=int, default=8, help="max_tokens of each completion")
    parser.add_argument("--direct-calls", type=int, default=5, help="direct calls that measure the server time")
    parser.add_argument("--seed", type=int, default=0, help="generate()'s seed (the same prompts in both runs)")
    parser.add_argument("--prompt", choices=("full", "short", "both"), default="full",
                        help='full: upstream prompt.txt + seed tasks (template=None); short: a second configuration, '
                             'template="" (the seed tasks without prompt.txt); both: one after the other')
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 2 or args.max_tokens < 1 or args.direct_calls < 1 or args.latency < 0:
        parser.error("need --requests >= 1, --concurrency >= 2, --max-tokens >= 1, --direct-calls >= 1, --latency >= 0")

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print("bench_generate: self-instruct generate() throughput, concurrency 1 vs "
          f"{args.concurrency}, embedded llama.cpp server behind a FaultProxy with added latency")
    print(f"settings: latency {args.latency:g} s, max_requests {args.requests}, concurrency 1 vs {args.concurrency}, "
          f"api completions, max_tokens {args.max_tokens}, seed {args.seed}, direct calls {args.direct_calls}, "
          f"CPUs {os.cpu_count()}, 1-min load average at start {load:.2f}, "
          f"ALPACA_NB_DATA_DIR={os.environ['ALPACA_NB_DATA_DIR']}")

    seed_tasks = load_seed_tasks()
    started = time.perf_counter()
    ok = True
    with local_server() as server:
        print(f"server: {server.model} at {server.base_url} (started in {time.perf_counter() - started:.1f} s)")
        count_tokens("warm up the tokenizer", server.model)  # generate() counts prompt tokens: load it untimed
        if args.prompt in ("full", "both"):
            ok &= benchmark("full prompt (upstream prompt.txt + 3 seed tasks), template=None", server, args,
                            seed_tasks, None)
        if args.prompt in ("short", "both"):
            ok &= benchmark('short prompt (3 seed tasks, no prompt.txt), template="" -- second configuration',
                            server, args, seed_tasks, "")
    print(f"\ntotal time {time.perf_counter() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
