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
its last file write). The stage folders' records are ``stage_folders``'; the report card is built by
``report_card`` and rendered by ``report_pages`` (both re-exported here).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from alpaca_nb import __version__
from alpaca_nb.jsonl import write_text_atomically
from alpaca_nb.report_card import REPORT_SCHEMA, UNITS, WATERMARK_FILE, environment, read_report, report_from_stages
from alpaca_nb.report_pages import (
    REPORT_FIGURES, environment_lines, format_value, metrics_frame, report_figure, report_figures, report_html,
    report_markdown, stages_frame, write_report,
)
from alpaca_nb.stage_folders import (
    MANIFEST, MANIFEST_SCHEMA, SEGMENTS, STARTED, STOPPED, Provenance, StageError, StageStop, StageStopped,
    _begin_segment, _claim_fresh_folder, _end_segment, _fingerprint, file_sha256, read_manifest, read_stop,
    remove_stage_folder, stage_status,
)

__all__ = [
    "EVALUATED_SYSTEM", "MANIFEST", "REPORT_FIGURES", "REPORT_SCHEMA", "STAGES", "UNITS", "Provenance", "StageError",
    "StageStop", "StageStopped", "build_report", "ensure_stage", "environment", "environment_lines", "file_sha256",
    "format_value", "metrics_frame", "read_manifest", "read_report", "read_stop", "recipe_dir", "remove_stage_folder",
    "report_figure", "report_figures", "report_html", "report_markdown", "reproduce", "run_stages", "stage_status",
    "stages_frame", "training_time_prediction", "training_tokens_per_second", "write_report",
]

STAGES = ("generate", "sft_data", "fine_tune", "evaluate", "watermark")
PAPER_MODEL = "text-davinci-003"  # the paper's generation model: tokens are priced at its 2023 rate
EVALUATED_SYSTEM = "after the fine-tune (Alpaca template)"  # the evaluate stage's system: chapter 5 reads it by name


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


def build_report(out: str | os.PathLike, profile: Any) -> dict[str, Any]:
    """Return the report card of ``out``: a stage counts only when it is complete for the current inputs and
    settings; any other is reported with its status (new, interrupted, changed, waiting) and no figures, and a
    stopped one with its reason, the count it did, its time and dollars, but none of its figures."""
    run = _Run(profile, Path(out), None)
    return report_from_stages(out, profile, {stage: _status(stage, run)[0] for stage in STAGES})


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
