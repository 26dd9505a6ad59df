"""The whole recipe in one command, ``alpaca-nb reproduce``: stages with clean boundaries, and the report card.

Stages, each in its own folder under ``--out``: ``generate`` (self-instruct from the seed tasks) -> ``sft_data``
(what generation kept, topped up with real Alpaca records to the profile's size) -> ``fine_tune`` -> ``evaluate``
(replies, probes, TruthfulQA, the judge) -> ``watermark`` (detection on the fine-tuned model) -> the report.

A stage's folder is finished when its ``stage.json`` exists: written last, it records the provenance (input
files and their hashes, model, decoding settings, profile, package version, wall time, tokens, dollars). A
folder without it was interrupted: the stage resumes (generation continues its ledger, the fine-tune its last
checkpoint, the evaluation its reply cache). A stage whose work stopped early (the budget, a refused key, a
dead server, failures in a row) gets ``stage-stopped.json`` instead, with the reason and how much was done: it
is not complete either, and resumes the same way. A stage whose inputs or settings changed, or that another
version wrote, is run again; so is everything after it, because its inputs are the earlier stages' outputs.

A stage folder is created with ``stage-started.json`` already in it, and a rerun deletes a folder only when it
carries that marker (or ``stage.json``): a folder of the user's under ``--out`` is refused by name, never
removed. Human work (chapter 5's votes, the demo's flags) lives outside stage folders. A stage runs under
``--out/.<stage>.lock``: a second process running the same stage waits for the first, then skips what it did.
Wall time is summed over every run of a stage (``stage-segments.jsonl``; a run that was killed counts up to
its last file write).

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

import base64
import contextlib
import fcntl
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from alpaca_nb import __version__
from alpaca_nb.claims import SOURCE_URL
from alpaca_nb.data import DataError
from alpaca_nb.jsonl import append_records, read_records, write_text_atomically

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "EVALUATED_SYSTEM", "MANIFEST", "REPORT_FIGURES", "REPORT_SCHEMA", "STAGES", "UNITS", "Provenance", "StageError",
    "StageStop", "StageStopped", "build_report", "ensure_stage", "environment", "environment_lines", "file_sha256",
    "format_value", "metrics_frame", "read_manifest", "read_report", "read_stop", "recipe_dir", "remove_stage_folder",
    "report_figure", "report_figures", "report_html", "report_markdown", "reproduce", "run_stages", "stage_status",
    "stages_frame", "training_time_prediction", "training_tokens_per_second", "write_report",
]

STAGES = ("generate", "sft_data", "fine_tune", "evaluate", "watermark")
MANIFEST = "stage.json"
STARTED = "stage-started.json"  # the fingerprint a stage began with: an interrupted one resumes only if it matches
STOPPED = "stage-stopped.json"  # a stage whose work stopped early: why, and how much was done (StageStop)
SEGMENTS = "stage-segments.jsonl"  # one line when each run of the stage begins, one when it ends: the wall time
MANIFEST_SCHEMA = 1
REPORT_SCHEMA = 2  # 2: a stage may be "stopped", with its reason and count
PAPER_MODEL = "text-davinci-003"  # the paper's generation model: tokens are priced at its 2023 rate
EVALUATED_SYSTEM = "after the fine-tune (Alpaca template)"  # the evaluate stage's system: chapter 5 reads it by name
WATERMARK_FILE = "watermark.json"  # the detection table the report reads; experiment.json holds every measurement


class StageError(DataError):
    """A stage folder that is incomplete, from another version, not ours, or whose earlier stage has not run."""


@dataclass(frozen=True)
class Provenance:
    """What a finished stage was made from and what it cost: its folder's ``stage.json``."""

    stage: str
    fingerprint: str  # sha256 of inputs and settings: a change reruns the stage
    inputs: dict[str, str]  # input file -> sha256
    settings: dict[str, Any]
    profile: str
    package_version: str
    schema: int
    finished_at: str
    wall_seconds: float
    tokens: int | None = None
    usd: float = 0.0
    usd_paper_rates: float | None = None
    note: str = ""
    measures: dict[str, float] = field(default_factory=dict)  # figures only the stage could take (e.g. tokens/s)


@dataclass(frozen=True)
class StageStop:
    """A stage whose work stopped early (the budget, a refused key, a dead server, failures in a row): its
    folder's ``stage-stopped.json``. Not complete: the next run resumes it, and the report says how far it got."""

    stage: str
    fingerprint: str
    reason: str  # as the stage's loop gave it ("stopped: ...")
    done: int | None  # how much of the stage's work was done, of how much, counted in ``unit``
    of: int | None
    unit: str
    stopped_at: str
    wall_seconds: float
    tokens: int | None = None
    usd: float = 0.0
    note: str = ""

    def summary(self) -> str:
        """Return the reason and the count done, as the report and the error print them."""
        return self.reason + (f", {self.done:,} of {self.of:,} {self.unit}" if self.done is not None else "")


class StageStopped(StageError):
    """Raised (after the report card is written) when a stage's work stopped early: rerun to resume it."""

    def __init__(self, stop: StageStop, folder: Path):
        self.stop = stop
        super().__init__(f"{folder}: the {stop.stage} stage {stop.summary()}. What it did is kept, and it is not "
                         "recorded as complete: run again to resume it")


def file_sha256(path: str | os.PathLike) -> str:
    """Return the sha256 of a file, or of a folder's files (names and contents, in sorted order)."""
    digest = hashlib.sha256()
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for item in files:
        digest.update(str(item.relative_to(path) if path.is_dir() else item.name).encode())
        with open(item, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _fingerprint(inputs: dict[str, str], settings: dict[str, Any]) -> str:
    payload = json.dumps({"inputs": inputs, "settings": settings, "schema": MANIFEST_SCHEMA, "version": __version__},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def read_manifest(folder: str | os.PathLike) -> Provenance:
    """Return a finished stage's provenance; StageError when the folder is incomplete or from another version."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise StageError(f"{folder}: incomplete: no {MANIFEST} (the stage was interrupted, or has not run)")
    try:
        provenance = Provenance(**json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError) as error:
        raise StageError(f"{path}: not a stage manifest of this version ({error})") from None
    if provenance.schema != MANIFEST_SCHEMA or provenance.package_version != __version__:
        raise StageError(f"{path}: written by alpaca_nb {provenance.package_version} (manifest schema "
                         f"{provenance.schema}); this is {__version__} (schema {MANIFEST_SCHEMA}): run the stage again")
    return provenance


def read_stop(folder: str | os.PathLike) -> StageStop | None:
    """Return why the stage in ``folder`` stopped early and how far it got, or None if it did not stop."""
    path = Path(folder) / STOPPED
    if not path.is_file():
        return None
    try:
        return StageStop(**json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError) as error:
        raise StageError(f"{path}: not a stage-stopped record of this version ({error}); delete it to resume") from None


def stage_status(folder: str | os.PathLike, fingerprint: str) -> str:
    """Return "complete" (finished with this fingerprint), "changed" (finished with other inputs or by another
    version), "stopped" (its work stopped early with this fingerprint: resumable), "interrupted" (started with
    this fingerprint, not finished: resumable) or "new"."""
    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        try:
            return "complete" if read_manifest(folder).fingerprint == fingerprint else "changed"
        except StageError:
            return "changed"
    stop = read_stop(folder)
    if stop is not None and stop.fingerprint == fingerprint:
        return "stopped"
    started = folder / STARTED
    if started.is_file() and json.loads(started.read_text(encoding="utf-8")).get("fingerprint") == fingerprint:
        return "interrupted"
    return "new"


# --------------------------------------------------------------------------- the stages


@dataclass(frozen=True)
class StageOutcome:
    """What a stage function returns: its cost, for the manifest, and whether its work stopped early."""

    tokens: int | None = None
    usd: float = 0.0
    usd_paper_rates: float | None = None
    note: str = ""
    stopped_reason: str | None = None  # set when the work stopped early: the stage is then not complete
    done: int | None = None  # with a stop: how much was done, of how much, counted in ``unit``
    of: int | None = None
    unit: str = ""
    measures: dict[str, float] = field(default_factory=dict)


@dataclass
class _Run:
    profile: Any
    out: Path
    budget_usd: float | None
    spent_usd: float = 0.0
    log: Callable[[str], None] = print
    statuses: dict[str, tuple] = field(default_factory=dict)  # _status per stage, until a stage runs

    def folder(self, stage: str) -> Path:
        return self.out / stage

    def remaining_budget(self, cap: float | None) -> float | None:
        """Return what a stage may spend: the profile's cap for it, within what is left of the run's budget."""
        left = None if self.budget_usd is None else max(0.0, self.budget_usd - self.spent_usd)
        return min((limit for limit in (left, cap) if limit is not None), default=None)


def _ledger_outcome(path: Path, note: str) -> StageOutcome:
    from alpaca_nb.api_costs import Ledger

    if not path.is_file():
        return StageOutcome(0, 0.0, 0.0, note)
    ledger = Ledger(path)
    return StageOutcome(ledger.total_tokens, ledger.total_usd, ledger.repriced_usd(PAPER_MODEL), note)


def _generate(run: _Run, folder: Path) -> StageOutcome:
    from alpaca_nb.selfinstruct import generate, live_funnel, teacher_endpoint

    profile, funnel = run.profile, live_funnel(run.profile)
    with teacher_endpoint(profile) as teacher:
        report = generate(teacher, profile.generate_instructions, folder,
                          budget_usd=run.remaining_budget(profile.generate_budget_usd),
                          concurrency=profile.generate_concurrency, sampling=funnel.sampling,
                          constraint=funnel.constraint, max_requests=profile.generate_max_requests)
    # The stage's output, the sft_data stage's input, exists even when the teacher kept nothing (then the mix is
    # all real records): a missing file would end the next stage in a FileNotFoundError.
    (folder / "generated.jsonl").touch()
    outcome = _ledger_outcome(folder / "ledger.jsonl", f"kept {report.kept} from {report.requests} requests "
                                                       f"({report.stopped_reason})")
    if not report.stopped_reason or report.stopped_reason.startswith("done"):  # the target, or the request limit
        return outcome
    return replace(outcome, stopped_reason=report.stopped_reason, done=report.kept, of=profile.generate_instructions,
                   unit="instructions kept")


def _sft_data(run: _Run, folder: Path) -> StageOutcome:
    from alpaca_nb.selfinstruct import kept_records
    from alpaca_nb.train import book_training_data

    data = book_training_data(run.profile, kept_records(run.folder("generate")), folder)  # with its mix.json
    return StageOutcome(note=data.mix.summary())


def _fine_tune(run: _Run, folder: Path) -> StageOutcome:
    from alpaca_nb.train import last_checkpoint, profile_config, read_book_data, train, uses_bf16
    from alpaca_nb.training_compute import local_accelerator

    config = profile_config(run.profile, str(folder / "run"), read_book_data(run.folder("sft_data")))
    checkpoint = last_checkpoint(config.output_dir)
    config = replace(config, resume=checkpoint is not None)
    device = local_accelerator("bfloat16" if uses_bf16(config) else "float32")  # the peak the prediction assumes
    result = train(config)
    if result.interrupted:
        raise StageError(f"{folder}: the fine-tune stopped before its last step")
    epochs = result.global_step * config.global_batch_size / max(1, result.data_report.kept)  # max_steps may cut it
    steps_this_run = result.global_step - (int(Path(checkpoint).name.rsplit("-", 1)[1]) if checkpoint else 0)
    rate = training_tokens_per_second(result, config.global_batch_size, steps_this_run)
    measures = {} if rate is None else {"training_tokens_per_second": rate}
    measures.update(training_time_prediction(result, config.global_batch_size, steps_this_run, device))
    return StageOutcome(result.data_report.total_tokens, 0.0, _finetune_usd_paper_rates(result, epochs),
                        f"{result.global_step} steps, held-out loss {result.eval_loss_before:.3f} -> "
                        f"{result.eval_loss_after:.3f}"
                        if None not in (result.eval_loss_before, result.eval_loss_after) else "",
                        measures=measures)


def training_time_prediction(result: Any, global_batch_size: int, steps_this_run: int, device: Any,
                             mfu: float = 0.4) -> dict[str, float]:
    """Return the report card's prediction beside the fact for the run that finished: its training seconds
    predicted from its FLOPs (6ND, 4ND for LoRA, on the tokens of the steps *it* trained) at ``mfu`` of
    ``device``'s peak (a ``training_compute.GPU``), the seconds it took, and the MFU that implies; {} when it
    trained no step."""
    from alpaca_nb.training_compute import finetune_flops, implied_mfu, lora_flops, training_time

    if steps_this_run <= 0 or not result.elapsed_seconds:
        return {}
    mean_tokens = result.data_report.total_tokens / max(1, result.data_report.kept)
    flops = finetune_flops(result.total_parameters, steps_this_run * global_batch_size * mean_tokens)
    flops = (lora_flops(flops) if result.lora else flops).total
    processes = max(1, result.world_size)
    return {"predicted_train_seconds": training_time(flops, device, processes, mfu).wall_hours * 3600,
            "train_seconds": result.elapsed_seconds, "assumed_mfu": mfu, "peak_tflops": device.peak_bf16_tflops,
            "achieved_mfu": implied_mfu(flops, device, processes, result.elapsed_seconds / 3600)}


def training_tokens_per_second(result: Any, global_batch_size: int, steps_this_run: int) -> float | None:
    """Return the training tokens per second of the run that finished: the steps *it* trained (a resumed run
    continues from a checkpoint, and ``result.global_step`` counts the earlier runs' steps too) over its
    training time; None when it trained no step."""
    if steps_this_run <= 0 or not result.elapsed_seconds:
        return None
    mean_tokens = result.data_report.total_tokens / max(1, result.data_report.kept)
    return steps_this_run * global_batch_size * mean_tokens / result.elapsed_seconds


def _finetune_usd_paper_rates(result: Any, epochs: float) -> float:
    """Return the run's FLOPs (6ND, or 4ND for LoRA) priced on the paper's A100s at 40 % MFU."""
    from alpaca_nb.claims import PAPER_FINETUNE_GPU, PAPER_FINETUNE_GPUS
    from alpaca_nb.training_compute import finetune_flops, lora_flops, training_time

    flops = finetune_flops(result.total_parameters, result.data_report.total_tokens, epochs)
    flops = lora_flops(flops) if result.lora else flops
    return training_time(flops.total, PAPER_FINETUNE_GPU, PAPER_FINETUNE_GPUS, 0.4).cost_usd


def _load_tuned(run: _Run):
    from alpaca_nb.models import load_model

    return load_model(str(run.folder("fine_tune") / "run" / "final"), device=run.profile.device)


def _evaluate(run: _Run, folder: Path) -> StageOutcome:
    from alpaca_nb.evaluate import run_evaluation
    from alpaca_nb.judge import judge_endpoint

    profile = run.profile
    model, tokenizer = _load_tuned(run)
    with judge_endpoint(profile) as judge:
        results = run_evaluation(
            folder, EVALUATED_SYSTEM, template="alpaca", model=model, tokenizer=tokenizer,
            instructions=profile.eval_instructions, max_new_tokens=profile.eval_max_new_tokens,
            probes=profile.eval_probes, probe_max_new_tokens=profile.probe_max_new_tokens,
            truthfulqa_questions=profile.truthfulqa_questions,
            judge=judge, judge_calibration_pairs=profile.judge_calibration_pairs,
            judge_budget_usd=run.remaining_budget(profile.judge_budget_usd), concurrency=profile.generate_concurrency)
    judged = results.judge or {}
    outcome = _ledger_outcome(folder / "ledger.jsonl", f"{len(results.replies)} replies judged by "
                                                       f"{judged.get('judge', 'no judge')}")
    if not results.stopped_reason:
        return outcome
    return replace(outcome, stopped_reason=results.stopped_reason, done=judged.get("judged"), of=judged.get("pairs"),
                   unit="judge pairs judged (calibration and verdicts)")


def _watermark(run: _Run, folder: Path) -> StageOutcome:
    from alpaca_nb import safety
    from alpaca_nb.data import load_eval_instructions
    from alpaca_nb.evaluate import templated_prompts
    from alpaca_nb.hallucination import evenly_spaced

    profile = run.profile
    model, tokenizer = _load_tuned(run)
    prompts = templated_prompts(evenly_spaced(load_eval_instructions(), profile.watermark_prompts), "alpaca", tokenizer)
    experiment = safety.run_watermark_experiment(model, tokenizer, prompts,
                                                 lengths=safety.detection_lengths(profile.watermark_max_tokens),
                                                 add_special_tokens=True)
    safety.write_experiment(experiment, folder / safety.EXPERIMENT_FILE)  # chapter 6 reads every measurement
    table = safety.detection_table(experiment)
    rows = {int(length): {key: float(value) for key, value in row.items()} for length, row in table.iterrows()}
    write_text_atomically(folder / WATERMARK_FILE, json.dumps({
        "texts": len(prompts), "temperature": experiment.temperature, "threshold_z": experiment.threshold,
        "by_length": rows}, indent=1) + "\n")
    return StageOutcome(note=f"{len(prompts)} prompts, {profile.watermark_max_tokens} tokens each")


_RUNNERS: dict[str, Callable[[_Run, Path], StageOutcome]] = {
    "generate": _generate, "sft_data": _sft_data, "fine_tune": _fine_tune, "evaluate": _evaluate,
    "watermark": _watermark,
}
_PREVIOUS = {"sft_data": ("generate",), "fine_tune": ("sft_data",), "evaluate": ("fine_tune",),
             "watermark": ("fine_tune",)}


def _settings(stage: str, profile: Any) -> dict[str, Any]:
    """Return the profile settings a stage depends on: a change to any of them reruns it."""
    keys = {
        "generate": ("teacher_base_url", "teacher_model", "generate_instructions", "generate_max_requests",
                     "generate_max_tokens", "generate_temperature", "generate_format", "generate_concurrency",
                     "generate_budget_usd"),
        "sft_data": ("finetune_asset", "finetune_examples", "finetune_eval_examples"),
        "fine_tune": ("base_model", "finetune_max_steps"),
        "evaluate": ("eval_instructions", "eval_max_new_tokens", "probe_max_new_tokens", "eval_probes",
                     "truthfulqa_questions", "judge_base_url", "judge_model", "judge_calibration_pairs",
                     "judge_budget_usd"),
        "watermark": ("watermark_prompts", "watermark_max_tokens"),
    }[stage]
    settings = {key: getattr(profile, key) for key in keys}
    if stage == "watermark":  # the scheme itself: a change (e.g. where delta is added) makes old results stale
        from alpaca_nb.safety import watermark_settings

        settings["watermark"] = watermark_settings()
    return settings


def _inputs(stage: str, run: _Run) -> dict[str, str]:
    """Return the stage's input files and their hashes: upstream data, then earlier stages' outputs."""
    from alpaca_nb.data import resolve

    if stage == "generate":
        files = {"seed_tasks": resolve("seed_tasks"), "prompt": resolve("prompt")}
    elif stage == "sft_data":
        files = {"generated.jsonl": run.folder("generate") / "generated.jsonl",
                 run.profile.finetune_asset: resolve(run.profile.finetune_asset)}
    elif stage == "fine_tune":
        files = {"training_data.json": run.folder("sft_data") / "training_data.json"}
    else:
        files = {"final model": run.folder("fine_tune") / "run" / "final"}
    return {name: file_sha256(path) for name, path in files.items()}


def _status(stage: str, run: _Run) -> tuple[str, dict[str, str], dict[str, Any], str]:
    """Return the stage's status ("waiting" while an earlier stage is not complete), inputs, settings, fingerprint.

    Computed once per stage until a stage runs: hashing the inputs (a whole model for the later stages) is the
    expensive part."""
    if stage not in run.statuses:
        settings = _settings(stage, run.profile)
        if any(_status(previous, run)[0] != "complete" for previous in _PREVIOUS.get(stage, ())):
            run.statuses[stage] = ("waiting", {}, settings, "")
        else:
            inputs = _inputs(stage, run)
            fingerprint = _fingerprint(inputs, settings)
            run.statuses[stage] = (stage_status(run.folder(stage), fingerprint), inputs, settings, fingerprint)
    return run.statuses[stage]


def _is_ours(folder: Path) -> bool:
    """Return True when ``folder`` is a stage folder this package made (its marker, written before any work, or
    its manifest is there) or holds nothing."""
    return (folder / STARTED).is_file() or (folder / MANIFEST).is_file() or not any(folder.iterdir())


def remove_stage_folder(folder: str | os.PathLike) -> None:
    """Delete a stage folder this package made, for a fresh run; StageError naming it, with nothing deleted, when
    it is not one (a folder of the user's that happens to sit where a stage goes)."""
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir() or not _is_ours(folder):
        raise StageError(f"{folder}: in the way of the {folder.name} stage, and not a stage folder (no {STARTED} or "
                         f"{MANIFEST} in it): nothing was deleted; move it away or choose another --out")
    shutil.rmtree(folder)


def _claim_fresh_folder(folder: Path, fingerprint: str) -> None:
    """Replace ``folder`` (if ours) by an empty stage folder that carries its marker from the first moment: it is
    made under a temporary name, marked, then renamed into place."""
    remove_stage_folder(folder)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-starting-", dir=folder.parent))
    staging.chmod(0o755)
    write_text_atomically(staging / STARTED, json.dumps({"fingerprint": fingerprint}) + "\n")
    staging.rename(folder)


@contextlib.contextmanager
def _stage_lock(run: _Run, stage: str) -> Iterator[bool]:
    """Hold ``out/.<stage>.lock`` while the stage runs; yield whether another process held it first (and this
    one waited for it to finish)."""
    path = run.out / f".{stage}.lock"
    with open(path, "a", encoding="utf-8") as handle:
        waited = False
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            run.log(f"{stage}: another process is running this stage in {run.folder(stage)} (it holds {path}): "
                    "waiting for it to finish")
            fcntl.flock(handle, fcntl.LOCK_EX)
            waited = True
        try:
            yield waited
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _segments(folder: Path) -> list[dict[str, float]]:
    records = []
    for number, record in read_records(folder / SEGMENTS):
        if not isinstance(record.get("started"), (int, float)) or not isinstance(record.get("ended", 0), (int, float)):
            raise StageError(f"{folder / SEGMENTS}, line {number}: not a segment record (started, ended)")
        records.append(record)
    return records


def _begin_segment(folder: Path) -> float:
    """Record that a run of the stage begins (and return when). A run that a kill ended never recorded its end:
    it is closed first, at the last write it made in the folder."""
    records = _segments(folder)
    ended = {record["started"] for record in records if "ended" in record}
    killed = [record["started"] for record in records if record["started"] not in ended]
    last_write = max((item.stat().st_mtime for item in folder.rglob("*") if item.is_file()), default=0.0)
    append_records(folder / SEGMENTS, [{"started": started, "ended": max(started, last_write), "killed": True}
                                       for started in killed])
    now = time.time()
    append_records(folder / SEGMENTS, [{"started": now}])
    return now


def _end_segment(folder: Path, started: float) -> float:
    """Record that the run begun at ``started`` ends; return the stage's wall seconds over all its runs."""
    append_records(folder / SEGMENTS, [{"started": started, "ended": time.time()}])
    return round(sum(record["ended"] - record["started"] for record in _segments(folder) if "ended" in record), 1)


def _run_stage(stage: str, run: _Run) -> Provenance:
    folder = run.folder(stage)
    with _stage_lock(run, stage) as waited:
        # Another process may have run this stage (and so changed later stages' inputs) while this one waited.
        if waited:
            run.statuses.clear()
        else:
            run.statuses.pop(stage, None)
        status, inputs, settings, fingerprint = _status(stage, run)
        if status == "waiting":
            waiting = [p for p in _PREVIOUS[stage] if _status(p, run)[0] != "complete"]
            raise StageError(f"{stage} needs {', '.join(waiting)} to finish first (its folder: {run.folder(waiting[0])})")
        if status == "complete":
            run.log(f"{stage}: complete, skipped ({folder})")
            return read_manifest(folder)
        if status in ("new", "changed"):
            if status == "changed":
                run.log(f"{stage}: its inputs or settings changed since it ran: running it again")
            _claim_fresh_folder(folder, fingerprint)
        run.log(f"{stage}: {'resuming' if status in ('interrupted', 'stopped') else 'running'} in {folder}")
        (folder / STOPPED).unlink(missing_ok=True)  # from here on, a kill leaves it "interrupted"
        started = _begin_segment(folder)
        try:
            outcome = _RUNNERS[stage](run, folder)
        finally:
            wall_seconds = _end_segment(folder, started)
        run.statuses.clear()  # the later stages' inputs are this one's outputs
        finished_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if outcome.stopped_reason:
            stop = StageStop(stage, fingerprint, outcome.stopped_reason, outcome.done, outcome.of, outcome.unit,
                             finished_at, wall_seconds, outcome.tokens, outcome.usd, outcome.note)
            write_text_atomically(folder / STOPPED, json.dumps(asdict(stop), indent=1) + "\n")
            raise StageStopped(stop, folder)
        provenance = Provenance(stage, fingerprint, inputs, settings, run.profile.name, __version__, MANIFEST_SCHEMA,
                                finished_at, wall_seconds, outcome.tokens, outcome.usd, outcome.usd_paper_rates,
                                outcome.note, outcome.measures)
        write_text_atomically(folder / MANIFEST, json.dumps(asdict(provenance), indent=1) + "\n")
    run.log(f"{stage}: done in {provenance.wall_seconds:.0f} s. {outcome.note}")
    return provenance


def run_stages(profile: Any, out: str | os.PathLike, stages: Sequence[str] = STAGES, *,
               budget_usd: float | None = None, log: Callable[[str], None] = print) -> dict[str, Provenance]:
    """Run ``stages`` into ``out`` in the recipe's order (skipping complete ones, resuming interrupted or stopped
    ones); return each one's provenance. ``budget_usd`` caps the dollars of them all together. A stage whose work
    stops early does not stop the stages that do not need it; once they ran, its StageStopped is raised."""
    unknown = [stage for stage in stages if stage not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; the stages: {', '.join(STAGES)}")
    run = _Run(profile, Path(out), budget_usd, log=log)
    run.out.mkdir(parents=True, exist_ok=True)
    done: dict[str, Provenance] = {}
    stopped: list[StageStopped] = []
    for stage in (stage for stage in STAGES if stage in stages):
        if stopped and any(_status(previous, run)[0] != "complete" for previous in _PREVIOUS.get(stage, ())):
            run.log(f"{stage}: not run: it needs a stage that stopped")
            continue
        try:
            done[stage] = _run_stage(stage, run)
        except StageStopped as stop:
            run.log(str(stop))
            run.spent_usd += stop.stop.usd
            stopped.append(stop)
            continue
        run.spent_usd += done[stage].usd
    if stopped:
        raise stopped[0]
    return done


def recipe_dir(profile: Any) -> Path:
    """Return the profile's recipe folder in the user cache: the book's chapters run their stages there, and
    its last page reports on them."""
    return profile.run_dir("recipe")


def ensure_stage(profile: Any, stage: str, *, log: Callable[[str], None] | None = None) -> Path:
    """Return ``stage``'s folder in the profile's recipe folder, first running it and every earlier stage it
    needs, each only if it is not complete for its inputs: how the chapters share their work. A stage whose work
    stops early (the budget, a dead server...) raises StageStopped, saying why and how far it got: a chapter
    never shows figures of a stage that did not finish; running the chapter again resumes it."""
    needed, pending = [], [stage]
    while pending:
        needed.append(pending.pop())
        pending += _PREVIOUS.get(needed[-1], ())
    run_stages(profile, recipe_dir(profile), needed, log=log or (lambda line: None))
    return recipe_dir(profile) / stage


def reproduce(profile: Any, out: str | os.PathLike, *, budget_usd: float | None = None,
              stages: Sequence[str] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the recipe's stages into ``out`` (skipping finished ones, resuming interrupted or stopped ones), then
    write the report card; returns ``report.json``'s content. ``stages`` runs only those; the others must be
    finished to report them (a stage that has not run is reported as such). When a stage's work stopped early,
    the report card (with the stop) is written and StageStopped raised: ``alpaca-nb reproduce`` exits non-zero."""
    try:
        run_stages(profile, out, STAGES if stages is None else stages, budget_usd=budget_usd, log=log)
    except StageStopped:
        write_report(build_report(out, profile), out)  # the stop's reason and count, and the stages that finished
        log(f"report card (a stage stopped early): {Path(out) / 'report.md'} and report.html")
        raise
    report = build_report(out, profile)
    write_report(report, out)
    log(f"report card: {Path(out) / 'report.md'} and report.html")
    return report


# --------------------------------------------------------------------------- the report card


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


def build_report(out: str | os.PathLike, profile: Any) -> dict[str, Any]:
    """Return the report card of ``out``: a stage counts only when it is complete for the current inputs and
    settings; any other is reported with its status (new, interrupted, changed, waiting) and no figures, and a
    stopped one with its reason, the count it did, its time and dollars, but none of its figures."""
    from alpaca_nb.claims import PAPER_FINETUNE_HOURS, PAPER_FINETUNE_USD, PAPER_GENERATION_USD, PAPER_INSTRUCTIONS

    out = Path(out)
    run = _Run(profile, out, None)
    statuses = {stage: _status(stage, run)[0] for stage in STAGES}
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


def format_value(value: float | None, unit: str) -> str:
    """Return a metric's value as the report prints it, by its unit."""
    if value is None:
        return "not measured"
    return {"count": f"{value:,.0f}", "share": f"{value:.1%}", "loss": f"{value:.3f}", "usd": f"${value:,.2f}" if value >= 0.01 or value == 0 else f"${value:.2g}",
            "hours": f"{value:.3f} h", "tokens/s": f"{value:,.0f}"}[unit]


_STATUS_WORDS = {"new": "not run", "interrupted": "interrupted (rerun to resume)",
                 "changed": "out of date (its inputs changed)", "waiting": "waiting for an earlier stage"}


def _status_words(info: dict[str, Any]) -> str:
    """Return a stage's status as the report prints it; a stopped one with its reason and the count done."""
    if info["status"] == "stopped":
        count = "" if info["done"] is None else f", {info['done']:,} of {info['of']:,} {info['unit']}"
        return f"{info['stop_reason']}{count} (rerun to resume)"
    return _STATUS_WORDS.get(info["status"], info["status"])


def report_markdown(report: dict[str, Any]) -> str:
    """Return the report card as Markdown: stages (time, tokens, dollars), metrics beside the paper, environment."""
    kind = "smoke-size " if report["smoke"] else ""
    stand_ins = report.get("stand_ins") or {}
    overlaid = f" with stand-ins for {', '.join(stand_ins)}" if stand_ins else ""
    lines = [f"# Alpaca reproduced: report card ({report['profile']} profile{overlaid}, {kind}run)", "",
             f"Written {report['created']}. The paper's figures are the release's ({SOURCE_URL}); ours come from "
             "this run" + (" of the embedded 135M model, offline: not comparable in size to LLaMA-7B" if
                           report["profile"] == "laptop" else "") + ".", "",
             *([f"Stand-ins (set by ALPACA_NB_<SETTING> variables): "
                f"{'; '.join(f'{key} = {value}' for key, value in stand_ins.items())}.", ""] if stand_ins else []),
             "## Stages", "", "| stage | wall time | tokens | dollars spent | at the paper's 2023 rates | note |",
             "|---|---|---|---|---|---|"]
    for stage, info in report["stages"].items():
        if info["status"] == "stopped":
            tokens = "" if info["tokens"] is None else f"{info['tokens']:,}"
            lines.append(f"| {stage} | {_status_words(info)}; {info['wall_seconds']:.0f} s so far | {tokens} | "
                         f"{format_value(info['usd'], 'usd')} | | {info['note']} |")
            continue
        if info["status"] != "complete":
            lines.append(f"| {stage} | {_status_words(info)} | | | | |")
            continue
        paper_rates = "" if info["usd_paper_rates"] is None else format_value(info["usd_paper_rates"], "usd")
        tokens = "" if info["tokens"] is None else f"{info['tokens']:,}"
        lines.append(f"| {stage} | {info['wall_seconds']:.0f} s | {tokens} | {format_value(info['usd'], 'usd')} | {paper_rates} | "
                     f"{info['note']} |")
    lines += ["", "## Metrics beside the paper", "", "| metric | ours | 95 % interval | the paper |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(_metric_row(metric).values()) + " |" for metric in report["metrics"]]
    lines += ["", "## Environment", "", *(f"- {line}" for line in environment_lines(report["environment"])), ""]
    return "\n".join(lines)


def environment_lines(env: dict[str, Any]) -> list[str]:
    """Return the report's environment as lines of text: profile and commit, python, CPU and GPU, packages."""
    packages = ", ".join(f"{name} {ver}" for name, ver in env["packages"].items() if ver)
    return [f"profile: {env['profile']}; git commit: {env['git_commit'] or 'not a checkout'}",
            f"python {env['python']} on {env['platform']}",
            f"CPU: {env['cpu']} ({env['cpu_count']} cores); GPU: {env['gpu'] or 'none'}", f"packages: {packages}"]


def stages_frame(report: dict[str, Any]) -> "pd.DataFrame":
    """Return the report's stages as a table: status, wall time, tokens, dollars spent and at the paper's rates."""
    import pandas as pd

    rows = {}
    for stage, info in report["stages"].items():
        complete = info["status"] == "complete"
        ran = complete or info["status"] == "stopped"  # a stopped stage has its time, tokens and dollars so far
        rows[stage] = {
            "status": "complete" if complete else _status_words(info),
            "wall time": f"{info['wall_seconds']:.0f} s" if ran else "",
            "tokens": f"{info['tokens']:,}" if ran and info["tokens"] is not None else "",
            "dollars spent": format_value(info["usd"], "usd") if ran else "",
            "at the paper's 2023 rates": format_value(info["usd_paper_rates"], "usd")
            if complete and info["usd_paper_rates"] is not None else "",
            "note": info.get("note", ""),
        }
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("stage")


def metrics_frame(report: dict[str, Any]) -> "pd.DataFrame":
    """Return the report's metrics as a table: ours (with its 95 % interval) beside the paper's figure."""
    import pandas as pd

    rows = [_metric_row(metric) for metric in report["metrics"]]
    return pd.DataFrame(rows, columns=["metric", "ours", "95 % interval", "the paper"]).set_index("metric")


def _metric_row(metric: dict[str, Any]) -> dict[str, str]:
    """Return one metric as the report's table shows it: label, ours, the 95 % interval, the paper's figure."""
    unit = metric["unit"]
    interval = "" if metric["interval"] is None else " to ".join(format_value(v, unit) for v in metric["interval"])
    ours = metric.get("withheld") or format_value(metric["ours"], unit)  # reports before "withheld" lack it
    return {"metric": metric["label"], "ours": ours, "95 % interval": interval,
            "the paper": metric["paper"] or "-"}


REPORT_FIGURES = ("generation_funnel", "loss_curve")


def report_figure(report: dict[str, Any], key: str) -> tuple[str, Any] | None:
    """Return (caption, matplotlib figure) for one of ``REPORT_FIGURES``, or None when the run lacks its data."""
    import matplotlib.pyplot as plt

    if not report[key]:
        return None
    figure, axis = plt.subplots(figsize=(7, 3.2), constrained_layout=True)
    if key == "loss_curve":
        steps, losses = zip(*report["loss_curve"])
        axis.plot(steps, losses, marker="o", markersize=3)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("training loss (each step's batch)")
        axis.set_title("Fine-tune loss curve")
        return "The fine-tune's training loss per optimizer step (each point a different batch).", figure
    funnel = report["generation_funnel"]
    bars = axis.bar(list(funnel), [max(count, 0.8) for count in funnel.values()], color="#66c2a5")
    axis.bar_label(bars, labels=[f"{count:,}" for count in funnel.values()])
    axis.set_yscale("log")
    axis.set_ylim(0.7, None)
    axis.set_ylabel("task blocks (log scale)")
    axis.set_title("Generation funnel")
    return "Where the generated task blocks went: parsed, passed upstream's filters, kept.", figure


def report_figures(report: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """Return every figure the run has data for: {key: (caption, figure)}."""
    return {key: figure for key in REPORT_FIGURES if (figure := report_figure(report, key)) is not None}


def report_html(report: dict[str, Any]) -> str:
    """Return the report card as one self-contained HTML page (the figures inlined as PNG)."""
    import html

    import matplotlib.pyplot as plt

    body = [f"<pre>{html.escape(report_markdown(report))}</pre>"]
    for caption, figure in report_figures(report).values():
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
        plt.close(figure)
        encoded = base64.b64encode(buffer.getvalue()).decode()
        body.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{encoded}">'
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>alpaca-nb report card</title></head><body>"
            + "\n".join(body) + "</body></html>\n")


def write_report(report: dict[str, Any], out: str | os.PathLike) -> None:
    """Write ``report.json``, ``report.md`` and ``report.html`` into ``out``."""
    out = Path(out)
    write_text_atomically(out / "report.json", json.dumps(report, indent=1) + "\n")
    write_text_atomically(out / "report.md", report_markdown(report))
    write_text_atomically(out / "report.html", report_html(report))
