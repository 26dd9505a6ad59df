"""Benchmark alpaca_nb.rouge.RougeLFilter against Alpaca's rouge-score scan, on real instructions.

Usage::

    python benchmarks/bench_dedup.py [--sizes 1000 10000 50000] [--candidates 300] [--seed 0]

What it measures, all in one run so the ratios compare like with like:

* For each pool size, per candidate: the upstream scan (stanford_alpaca ``generate_instruction.py``:
  ``rouge_scorer._score_lcs`` of the new instruction against every pool member's tokens, the
  argsort top 10 and the max; single process) on a few candidates, and ours on many:
  ``add_if_novel`` (the decision, plus the add when novel) and ``most_similar`` (exact max and
  top 10). Novel and near-duplicate candidates are timed separately.
* Verification: on every candidate the scan timed, ours must give the same decision, the same
  max float and the same top-10 scores.
* Growth: a pool grown from the 175 seed tasks to 52,000 with ``add_if_novel`` over a
  deterministic candidate stream; a few of its decisions are re-checked with the scan against
  the pool as it was at that moment.

Where the texts come from (deterministic, ``random.Random(seed)``): the 1,274 real instructions
(175 seed tasks, 999 ``alpaca_gpt4_demo`` and 100 ``alpaca_sample`` Alpaca records, read with
alpaca_nb.data; ALPACA_NB_DATA_DIR, defaulting like the tests to ../shared/data/upstream). A pool of up to 1,274 is a sample
of them; a larger pool holds all of them plus "splices": the first words of one real
instruction followed by the last words of another, each word then replaced with probability 0.2
by a word drawn from the whole corpus. Novel candidates are fresh splices that the pool does not
reject; near-duplicate candidates are light edits of a pool member (one word dropped, swapped,
duplicated, upper-cased or replaced) that it does reject. The growth stream is the 1,099 real
Alpaca instructions, then splices, with every fourth candidate (on average) a light edit of an
earlier candidate instead.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from rouge_score import rouge_scorer
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Like tests/conftest.py: read the real files from ../shared/data/upstream when it exists.
if not os.environ.get("ALPACA_NB_DATA_DIR") and (ROOT.parent / "shared" / "data" / "upstream").is_dir():
    os.environ["ALPACA_NB_DATA_DIR"] = str(ROOT.parent / "shared" / "data" / "upstream")

from alpaca_nb.data import load_alpaca_data, load_seed_tasks  # noqa: E402
from alpaca_nb.rouge import RougeLFilter  # noqa: E402

GROWTH_TARGET = 52_000
SCAN_SECONDS_PER_SIZE = 5.0  # the scan is slow: sample only this much of it per size and kind
SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


# ---------------------------------------------------------------------------- texts


@dataclass(frozen=True)
class Corpus:
    seeds: list[str]
    alpaca: list[str]

    @property
    def real(self) -> list[str]:
        return self.seeds + self.alpaca

    @property
    def words(self) -> list[str]:
        return [word for text in self.real for word in text.split()]


def load_corpus() -> Corpus:
    seeds = [task.instruction for task in load_seed_tasks()]
    alpaca = [r.instruction for asset in ("alpaca_gpt4_demo", "alpaca_sample") for r in load_alpaca_data(asset=asset)]
    return Corpus(seeds, alpaca)


class TextMaker:
    """Deterministic new instructions built from real ones (see the module docstring)."""

    def __init__(self, corpus: Corpus, seed: int) -> None:
        self.rng = random.Random(seed)
        self.split = [text.split() for text in corpus.real]
        self.words = corpus.words

    def splice(self) -> str:
        head, tail = self.rng.choice(self.split), self.rng.choice(self.split)
        parts = head[: self.rng.randint(1, len(head))] + tail[self.rng.randrange(len(tail)) :]
        return " ".join(self.rng.choice(self.words) if self.rng.random() < 0.2 else word for word in parts)

    def light_edit(self, text: str) -> str:
        parts = text.split()
        i = self.rng.randrange(len(parts))
        edit = self.rng.randrange(5)
        if edit == 0 and len(parts) > 1:
            del parts[i]
        elif edit == 1 and len(parts) > 1:
            j = (i + 1) % len(parts)
            parts[i], parts[j] = parts[j], parts[i]
        elif edit == 2:
            parts.insert(i, parts[i])
        elif edit == 3:
            parts[i] = parts[i].upper()
        else:
            parts[i] = self.rng.choice(self.words)
        return " ".join(parts)


def build_pool(size: int, corpus: Corpus, maker: TextMaker) -> list[str]:
    if size <= len(corpus.real):
        return maker.rng.sample(corpus.real, size)
    return corpus.real + [maker.splice() for _ in range(size - len(corpus.real))]


def pick_candidates(near: RougeLFilter, make: Callable[[], str], duplicate: bool, count: int) -> list[str]:
    """Made candidates whose decision is the wanted kind (the scan re-checks a sample of them)."""
    picked: list[str] = []
    for _ in range(200 * count):
        if len(picked) == count:
            break
        text = make()
        if near.is_near_duplicate(text) == duplicate:
            picked.append(text)
    return picked


# ---------------------------------------------------------------------------- the two methods


@dataclass(frozen=True)
class ScanResult:
    decision: bool
    max_similarity: float
    scores: list[float]
    most_similar: dict[str, float]


def upstream_scan(text: str, pool: list[str], pool_tokens: list[list[str]], threshold: float = 0.7) -> ScanResult:
    """stanford_alpaca generate_instruction.py (single process): every score, top 10, max."""
    new_tokens = SCORER._tokenizer.tokenize(text)
    scores = [rouge_scorer._score_lcs(new_tokens, tokens).fmeasure for tokens in pool_tokens]
    most_similar = {pool[i]: scores[i] for i in np.argsort(scores)[-10:][::-1]}
    return ScanResult(max(scores) > threshold, max(scores), scores, most_similar)


def per_candidate(run: Callable[[str], object], candidates: list[str], label: str) -> tuple[float, list]:
    results, started = [], time.perf_counter()
    for text in tqdm(candidates, desc=label, leave=False, mininterval=1.0):
        results.append(run(text))
    return (time.perf_counter() - started) / max(1, len(candidates)), results


def agrees(ours: RougeLFilter, text: str, pool: list[str], scan: ScanResult) -> bool:
    """Same decision, same max float, and the top 10 distinct texts with the scan's scores."""
    by_text = dict(zip(reversed(pool), reversed(scan.scores)))  # one score per distinct text
    similar = ours.most_similar(text)
    return (
        ours.is_near_duplicate(text) == scan.decision
        and similar.max_similarity == scan.max_similarity
        and list(similar.most_similar.values()) == sorted(by_text.values(), reverse=True)[:10]
        and all(by_text[member] == score for member, score in similar.most_similar.items())
    )


# ---------------------------------------------------------------------------- benchmarks


@dataclass
class Row:
    size: int
    kind: str
    scan_n: int
    scan_s: float
    ours_n: int
    decide_s: float
    similar_s: float
    agreed: int

    @property
    def decide_speedup(self) -> float:
        return self.scan_s / self.decide_s

    @property
    def similar_speedup(self) -> float:
        return self.scan_s / self.similar_s


def bench_size(size: int, corpus: Corpus, count: int, seed: int) -> list[Row]:
    maker = TextMaker(corpus, seed + size)
    pool = build_pool(size, corpus, maker)
    started = time.perf_counter()
    near = RougeLFilter(pool)
    print(f"\npool {size:,}: built the index in {time.perf_counter() - started:.2f} s")
    pool_tokens = [SCORER._tokenizer.tokenize(text) for text in pool]
    scan_count = max(3, min(count, round(SCAN_SECONDS_PER_SIZE / (size * 1.8e-5))))
    kinds = {
        "novel": pick_candidates(near, maker.splice, False, count),
        "duplicate": pick_candidates(near, lambda: maker.light_edit(maker.rng.choice(pool)), True, count),
    }
    rows = []
    for kind, candidates in kinds.items():
        sample = candidates[:scan_count]
        scan_s, scans = per_candidate(lambda text: upstream_scan(text, pool, pool_tokens), sample, f"{size:,} {kind}: scan")
        agreed = sum(agrees(near, text, pool, scan) for text, scan in zip(sample, scans))
        similar_s, _ = per_candidate(near.most_similar, candidates, f"{size:,} {kind}: most_similar")
        # Last, as it adds the novel candidates (a few hundred more in a pool of thousands).
        decide_s, decisions = per_candidate(near.add_if_novel, candidates, f"{size:,} {kind}: add_if_novel")
        assert all(decision == (kind == "novel") for decision in decisions[: len(sample)])
        for text in (text for text, added in zip(candidates, decisions) if added):
            pool.append(text)  # keep the scan's pool equal to ours
            pool_tokens.append(SCORER._tokenizer.tokenize(text))
        row = Row(size, kind, len(sample), scan_s, len(candidates), decide_s, similar_s, agreed)
        print(
            f"  {kind:9}: scan {scan_s * 1e3:8.1f} ms/cand (n={row.scan_n})  "
            f"add_if_novel {decide_s * 1e3:6.3f} ms (n={row.ours_n}, x{row.decide_speedup:,.0f})  "
            f"most_similar {similar_s * 1e3:6.3f} ms (x{row.similar_speedup:,.0f})  agreed {agreed}/{row.scan_n}"
        )
        rows.append(row)
    return rows


def candidate_stream(corpus: Corpus, maker: TextMaker) -> Iterator[str]:
    seen = list(corpus.seeds)
    for text in corpus.alpaca:
        seen.append(text)
        yield text
    while True:
        text = maker.light_edit(maker.rng.choice(seen)) if maker.rng.random() < 0.25 else maker.splice()
        seen.append(text)
        yield text


@dataclass
class Growth:
    wall_s: float
    cpu_s: float
    processed: int
    rejected: int
    checked: int
    agreed: int


def bench_growth(corpus: Corpus, seed: int, checks: int) -> Growth:
    maker = TextMaker(corpus, seed)
    near = RougeLFilter(corpus.seeds)
    accepted = list(corpus.seeds)
    log: list[tuple[str, int, bool]] = []  # (candidate, pool size before it, accepted)
    wall, cpu = time.perf_counter(), time.process_time()
    with tqdm(total=GROWTH_TARGET, initial=len(near), desc="growing the pool", unit="inst") as bar:
        for text in candidate_stream(corpus, maker):
            if len(near) >= GROWTH_TARGET:
                break
            novel = near.add_if_novel(text)
            log.append((text, len(accepted), novel))
            if novel:
                accepted.append(text)
                bar.update(1)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    agreed = 0
    sample = random.Random(seed).sample(log, checks)
    for text, pool_size, novel in tqdm(sample, desc="re-checking growth with the scan", leave=False):
        pool = accepted[:pool_size]
        pool_tokens = [SCORER._tokenizer.tokenize(member) for member in pool]
        agreed += upstream_scan(text, pool, pool_tokens).decision == (not novel)
    rejected = sum(not novel for _, _, novel in log)
    return Growth(wall, cpu, len(log), rejected, checks, agreed)


def print_summary(rows: list[Row], growth: Growth | None) -> None:
    print("\nSUMMARY (per candidate; speed-ups = scan time / our time, measured in this run)")
    header = f"{'pool':>7} {'candidates':<10} {'scan ms':>9} {'add_if_novel ms':>16} {'speed-up':>9} {'most_similar ms':>16} {'speed-up':>9} {'agreed':>7}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row.size:>7,} {row.kind:<10} {row.scan_s * 1e3:>9.1f} {row.decide_s * 1e3:>16.3f} "
            f"{row.decide_speedup:>8,.0f}x {row.similar_s * 1e3:>16.3f} {row.similar_speedup:>8,.0f}x "
            f"{row.agreed:>3}/{row.scan_n:<3}"
        )
    total_checked = sum(row.scan_n for row in rows)
    total_agreed = sum(row.agreed for row in rows)
    verdict = "agreed on every" if total_agreed == total_checked else "DISAGREED on some"
    print(f"verification: ours vs the scan {verdict} sampled decision, max_similarity and top-10 scores "
          f"({total_agreed}/{total_checked})")
    if growth:
        print(
            f"growth 175 -> {GROWTH_TARGET:,}: {growth.wall_s:.1f} s wall, {growth.cpu_s:.1f} s CPU; "
            f"{growth.processed:,} candidates processed, {growth.rejected:,} rejected; "
            f"scan re-check of {growth.checked} decisions: {growth.agreed}/{growth.checked} agreed"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--candidates", type=int, default=300, help="candidates per size and kind for ours")
    parser.add_argument("--growth-checks", type=int, default=10, help="growth decisions re-checked with the scan")
    parser.add_argument("--no-growth", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    corpus = load_corpus()
    print(f"real instructions: {len(corpus.seeds)} seeds + {len(corpus.alpaca)} Alpaca = {len(corpus.real)}")
    rows = [row for size in args.sizes for row in bench_size(size, corpus, args.candidates, args.seed)]
    growth = None if args.no_growth else bench_growth(corpus, args.seed, args.growth_checks)
    print_summary(rows, growth)
    ok = all(row.agreed == row.scan_n for row in rows) and (growth is None or growth.agreed == growth.checked)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
