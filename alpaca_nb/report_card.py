"""The report card: ``report.json``'s content, built from a recipe folder's stages (their manifests, stop
records and outputs) and the statuses ``reproduce`` judged them to have; read back by chapter 7.

The report card (``report.json``, ``report.md``, ``report.html``). ``report.json`` is versioned by ``schema``
(``REPORT_SCHEMA``; a change of meaning bumps it):

- ``schema``, ``created``, ``profile``, ``smoke``, ``stand_ins`` (the profile settings that the stand-in overlay,
  ``ALPACA_NB_<SETTING>`` variables, replaced, and their values; empty when none), ``environment`` (python,
  platform, CPU, GPU, package versions, git commit);
- ``stages``: per stage ``status`` ("complete", or "new", "interrupted", "changed" when its inputs or settings
  changed since it ran, "waiting" for an earlier stage: those carry nothing else; or "stopped", with
  ``stop_reason``, ``done`` of ``of`` ``unit``, ``wall_seconds``, ``tokens``, ``usd``, ``note``); a complete one
  ``wall_seconds`` (every run of the stage), ``tokens``, ``usd`` (spent), ``usd_paper_rates`` (the same work priced
  at the paper's 2023 rates: text-davinci-003's tokens; the fine-tune's FLOPs on A100s at 40 % MFU at
  prices.toml's rate), ``note``, ``provenance`` (the stage's ``stage.json``);
- ``metrics``: a list of ``{key, label, unit, ours, interval, paper, paper_source}``; ``unit`` is one of
  ``UNITS`` (a share is a fraction of 1), ``ours`` a number or None (not measured in this run), ``interval`` a
  95 % ``[low, high]`` or None, ``paper`` the release's figure as text or None where it gives none;
- ``generation_funnel`` (generated blocks -> kept) and ``loss_curve`` (``[step, loss]``), the report's figures.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from alpaca_nb.claims import SOURCE_URL
from alpaca_nb.stage_folders import Provenance, StageError, read_manifest, read_stop

__all__ = [
    "REPORT_SCHEMA", "UNITS", "WATERMARK_FILE", "environment", "read_report", "report_from_stages",
]

REPORT_SCHEMA = 2  # 2: a stage may be "stopped", with its reason and count
WATERMARK_FILE = "watermark.json"  # the detection table the report reads; experiment.json holds every measurement


def environment(profile_name: str) -> dict[str, Any]:
    """Return what the report records about the machine: python, platform, CPU, GPU, packages, git commit."""
    from importlib.metadata import PackageNotFoundError, version

    packages = {}
    for name in ("alpaca-nb", "torch", "transformers", "accelerate", "peft", "openai", "datasets"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(), "gpu": _gpu_name(), "packages": packages, "git_commit": _git_commit(),
            "profile": profile_name}


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if done.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return done.stdout.strip() + ("-dirty" if dirty else "")
    return None


UNITS = ("count", "share", "loss", "usd", "hours", "tokens/s")


def _metric(key: str, label: str, unit: str, ours: float | None, paper: str | None = None,
            interval: Sequence[float] | None = None, source: str | None = None,
            withheld: str | None = None) -> dict[str, Any]:
    """Return one metric of the report; ``withheld`` says why ``ours`` is None although it was measured."""
    assert unit in UNITS, unit
    return {"key": key, "label": label, "unit": unit, "ours": ours,
            "interval": list(interval) if interval is not None else None,
            "paper": paper, "paper_source": (source or SOURCE_URL) if paper else None, "withheld": withheld}


def report_from_stages(out: str | os.PathLike, profile: Any, statuses: dict[str, str]) -> dict[str, Any]:
    """Return the report card of the recipe folder ``out`` whose stages have ``statuses`` (as ``reproduce``
    judges them): a stage counts only when it is "complete"; any other is reported with its status (new,
    interrupted, changed, waiting) and no figures, and a stopped one with its reason, the count it did, its time and
    dollars, but none of its figures."""
    from alpaca_nb.claims import PAPER_FINETUNE_HOURS, PAPER_FINETUNE_USD, PAPER_GENERATION_USD, PAPER_INSTRUCTIONS

    out = Path(out)
    done = {stage: read_manifest(out / stage) if status == "complete" else None for stage, status in statuses.items()}
    metrics: list[dict[str, Any]] = []
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "profile": profile.name, "smoke": bool(profile.smoke),
        "stand_ins": {key: getattr(profile, key) for key in getattr(profile, "stand_ins", ())},
        "environment": environment(profile.name),
        "stages": {stage: _stage_entry(statuses[stage], p, out / stage) for stage, p in done.items()},
        "metrics": metrics, "generation_funnel": None, "loss_curve": None,
    }
    if done["generate"]:
        from alpaca_nb.selfinstruct import load_run

        generation = load_run(out / "generate")
        report["generation_funnel"] = generation.funnel()
        metrics += [
            _metric("kept_instructions", "kept instructions", "count", generation.kept, f"{PAPER_INSTRUCTIONS:,} (\"52K\")"),
            _metric("keep_rate", "keep rate (kept / generated blocks)", "share", generation.keep_rate),
            _metric("generation_usd_paper_rates", "generation dollars at text-davinci-003's 2023 rate", "usd",
                    done["generate"].usd_paper_rates, f"< ${PAPER_GENERATION_USD:,.0f} for 52K"),
        ]
    if done["fine_tune"]:
        from alpaca_nb.train import load_result

        result = load_result(out / "fine_tune" / "run")
        report["loss_curve"] = [list(point) for point in result.loss_curve]
        # The stage measured its rate on the steps its last run trained: after a resume, global_step counts the
        # earlier runs' steps too, and elapsed_seconds only the last run's time.
        tokens_per_second = done["fine_tune"].measures.get("training_tokens_per_second")
        metrics += [
            _metric("held_out_loss_before", "held-out loss before the fine-tune", "loss", result.eval_loss_before),
            _metric("held_out_loss_after", "held-out loss after the fine-tune", "loss", result.eval_loss_after),
            _metric("finetune_hours", "fine-tune wall hours (every run of the stage, loading and held-out loss "
                    "included)", "hours", done["fine_tune"].wall_seconds / 3600,
                    f"{PAPER_FINETUNE_HOURS:g} h on 8 A100s (LLaMA-7B, 52K)"),
            _metric("finetune_usd_paper_rates", "fine-tune dollars, this run's FLOPs on A100s at 40 % MFU", "usd",
                    done["fine_tune"].usd_paper_rates, f"< ${PAPER_FINETUNE_USD:,.0f}"),
            _metric("training_tokens_per_second", "effective training tokens per second (the stage's last run)",
                    "tokens/s", tokens_per_second),
        ]
        measures = done["fine_tune"].measures
        if "predicted_train_seconds" in measures:  # stages finished before the prediction existed lack it
            metrics += [
                _metric("train_hours_predicted", f"training hours predicted (the stage's last run): its FLOPs at "
                        f"{measures['assumed_mfu']:.0%} MFU of {measures['peak_tflops']:.3g} TFLOP/s peak", "hours",
                        measures["predicted_train_seconds"] / 3600),
                _metric("train_hours", "training hours taken (the same run; loading and held-out loss excluded)",
                        "hours", measures["train_seconds"] / 3600),
                _metric("train_mfu", "model-FLOPs utilisation the run reached", "share", measures["achieved_mfu"]),
            ]
    if done["evaluate"]:
        metrics += _evaluation_metrics(out / "evaluate")
    if done["watermark"]:
        watermark = json.loads((out / "watermark" / WATERMARK_FILE).read_text(encoding="utf-8"))
        longest = max(watermark["by_length"], key=int)
        row = watermark["by_length"][longest]
        metrics += [
            _metric("watermark_detection", f"watermark detected at {longest} tokens (z > {watermark['threshold_z']:g})",
                    "share", row["detected (true positives)"], "the demo watermarked outputs (Kirchenbauer et al., 2023); "
                    "no rate given"),
            _metric("watermark_false_positives", f"plain texts flagged at {longest} tokens", "share", row["false positives"]),
        ]
    return report


def _stage_entry(status: str, provenance: Provenance | None, folder: Path) -> dict[str, Any]:
    """Return one stage's entry in ``report.json``'s ``stages``."""
    if provenance is not None:
        p = provenance
        return {"status": "complete", "wall_seconds": p.wall_seconds, "tokens": p.tokens, "usd": p.usd,
                "usd_paper_rates": p.usd_paper_rates, "note": p.note, "provenance": asdict(p)}
    stop = read_stop(folder) if status == "stopped" else None
    if stop is None:
        return {"status": status}
    return {"status": "stopped", "stop_reason": stop.reason, "done": stop.done, "of": stop.of, "unit": stop.unit,
            "wall_seconds": stop.wall_seconds, "tokens": stop.tokens, "usd": stop.usd, "note": stop.note}


def _evaluation_metrics(folder: Path) -> list[dict[str, Any]]:
    from alpaca_nb.evaluate import read_evaluation, win_rate

    results = read_evaluation(folder)
    paper = win_rate(90, 89)
    h = results.hallucination
    metrics = [_metric("hallucination_rate", f"wrong answers of {h['answered']} answered ({h['probes']} factual probes; "
                       f"{h['cut']} cut before answering, {h['abstained']} abstained)", "share", h["rate"],
                       "hallucinates (Dar es Salaam named as Tanzania's capital); no rate given", h["ci"])]
    metrics += _judge_metrics(results.judge or {}, paper)
    if results.truthfulqa:
        t = results.truthfulqa
        metrics += [_metric("truthfulqa_mc1", f"TruthfulQA MC1 ({t['questions']} of {t['of']})", "share", t["mc1"]),
                    _metric("truthfulqa_mc2", f"TruthfulQA MC2 ({t['questions']} of {t['of']})", "share", t["mc2"])]
    return metrics


def _judge_metrics(judge: dict[str, Any], paper: Any) -> list[dict[str, Any]]:
    """Return the judge's agreement with GPT-4, then its win rate, withheld when the agreement is too low."""
    from alpaca_nb.judge import Calibration, judge_usability

    metrics = []
    calibration = Calibration(**judge["calibration"]) if "calibration" in judge else None
    if calibration is not None:
        metrics.append(_metric("judge_agreement", f"judge agrees with GPT-4 on {calibration.pairs} AlpacaEval pairs",
                               "share", calibration.agreement, None, calibration.agreement_ci))
    if "win_rate" in judge:
        w, usability = judge["win_rate"], judge_usability(calibration)
        metrics.append(_metric("win_rate", f"win rate against text-davinci-003 ({judge['judge']} as judge)", "share",
                               w["rate"] if usability.usable else None,
                               f"{paper.rate:.1%} (90 wins vs 89, blind human raters)",
                               [w["ci_low"], w["ci_high"]] if usability.usable else None,
                               withheld=None if usability.usable else f"judge {usability.reason}"))
    return metrics


def read_report(out: str | os.PathLike) -> dict[str, Any]:
    """Return ``out/report.json``; StageError when it is missing or of another schema."""
    path = Path(out) / "report.json"
    if not path.is_file():
        raise StageError(f"{path}: no report card: run `alpaca-nb reproduce --out {out}`")
    report = json.loads(path.read_text(encoding="utf-8"))
    if report.get("schema") != REPORT_SCHEMA:
        raise StageError(f"{path}: report schema {report.get('schema')}, this version reads {REPORT_SCHEMA}")
    return report
