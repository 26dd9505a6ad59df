"""`alpaca-nb reproduce`: stage manifests, the report card, and the whole smoke recipe killed and resumed.

The smoke run is real: the embedded llama-server generates, the fine-tune takes real steps, the evaluation
and the watermark run on the fine-tuned model. It is SIGKILLed (with its llama-server: the whole process
group, as a batch scheduler would) inside a stage and again between stages, then finished by a rerun that
must not redo what was finished.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from alpaca_nb import __version__
from alpaca_nb.profiles import load_profile
from alpaca_nb.reproduce import (
    MANIFEST, REPORT_SCHEMA, STAGES, Provenance, StageError, build_report, file_sha256, format_value, read_manifest,
    read_report, report_markdown, reproduce, stage_status,
)


def _provenance(**changes) -> Provenance:
    base = Provenance("generate", "abc", {"seed_tasks": "00"}, {"teacher_model": "m"}, "laptop", __version__, 1,
                      "2026-12-03T00:00:00+00:00", 1.5)
    return replace(base, **changes)


def _write(folder: Path, provenance: Provenance) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).write_text(json.dumps(asdict(provenance)))


def test_a_folder_without_its_manifest_is_reported_incomplete_not_half_read(tmp_path):
    (tmp_path / "generated.jsonl").write_text("{}\n")
    with pytest.raises(StageError, match=r"incomplete: no stage.json"):
        read_manifest(tmp_path)
    assert stage_status(tmp_path, "abc") == "new"


def test_a_manifest_from_another_version_is_refused_by_name(tmp_path):
    _write(tmp_path, _provenance(package_version="0.0.1"))
    with pytest.raises(StageError, match=rf"written by alpaca_nb 0.0.1 .* this is {__version__}"):
        read_manifest(tmp_path)
    assert stage_status(tmp_path, "abc") == "changed"


def test_stage_status_follows_the_fingerprint(tmp_path):
    _write(tmp_path / "done", _provenance())
    assert stage_status(tmp_path / "done", "abc") == "complete"
    assert stage_status(tmp_path / "done", "other inputs") == "changed"
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "stage-started.json").write_text(json.dumps({"fingerprint": "abc"}))
    assert stage_status(tmp_path / "half", "abc") == "interrupted"
    assert stage_status(tmp_path / "half", "other inputs") == "new"  # started with other inputs: start over


def test_file_sha256_covers_a_folders_names_and_contents(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("one")
    first = file_sha256(tmp_path / "a")
    (tmp_path / "a" / "x.txt").write_text("two")
    second = file_sha256(tmp_path / "a")
    (tmp_path / "a" / "x.txt").rename(tmp_path / "a" / "y.txt")
    assert len({first, second, file_sha256(tmp_path / "a")}) == 3


def test_unknown_stages_and_a_stage_whose_inputs_are_missing_are_refused(tmp_path):
    profile = load_profile("laptop", smoke=True)
    with pytest.raises(ValueError, match="unknown stage"):
        reproduce(profile, tmp_path, stages=["train"])
    with pytest.raises(StageError, match=r"fine_tune needs sft_data to finish first"):
        reproduce(profile, tmp_path, stages=["fine_tune"], log=lambda line: None)


def test_an_empty_folder_reports_every_stage_as_not_run(tmp_path):
    report = build_report(tmp_path, load_profile("laptop", smoke=True))
    assert report["schema"] == REPORT_SCHEMA and report["metrics"] == []
    assert {stage: info["status"] for stage, info in report["stages"].items()} == {
        "generate": "new", **{stage: "waiting" for stage in STAGES[1:]}}
    text = report_markdown(report)
    assert "| generate | not run |" in text and "| fine_tune | waiting for an earlier stage |" in text
    from alpaca_nb.reproduce import metrics_frame, stages_frame

    assert dict(stages_frame(report)["status"]) == {"generate": "not run",
                                                    **{stage: "waiting for an earlier stage" for stage in STAGES[1:]}}
    assert metrics_frame(report).empty and list(metrics_frame(report).columns) == ["ours", "95 % interval", "the paper"]
    assert report["environment"]["packages"]["torch"] and report["environment"]["cpu"]


def test_ensure_stage_runs_only_what_is_missing_before_it_and_reruns_what_changed(tmp_path, monkeypatch):
    """How the chapters share stages: the stage runners are replaced by recorders that write the files the next
    stage hashes (the real runners are exercised by the smoke recipe below)."""
    from alpaca_nb import reproduce as module

    monkeypatch.setenv("ALPACA_NB_CACHE_DIR", str(tmp_path))
    profile = load_profile("laptop", smoke=True)
    outputs = {"generate": "generated.jsonl", "sft_data": "training_data.json", "fine_tune": "run/final/model.bin"}
    ran = []

    def recorder(stage):
        def run(_run, folder):
            ran.append(stage)
            path = folder / outputs.get(stage, "result.json")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{stage}, run {len(ran)}")  # new content each time: the next stage sees a change
            return module.StageOutcome(note=f"{stage} ran")
        return run

    monkeypatch.setattr(module, "_RUNNERS", {stage: recorder(stage) for stage in STAGES})
    assert module.ensure_stage(profile, "fine_tune") == module.recipe_dir(profile) / "fine_tune"
    assert ran == ["generate", "sft_data", "fine_tune"]
    module.ensure_stage(profile, "watermark")
    assert ran[3:] == ["watermark"]  # not evaluate: the watermark needs only the fine-tune
    (module.recipe_dir(profile) / "generate" / "generated.jsonl").write_text("another run")
    module.ensure_stage(profile, "fine_tune")
    assert ran[4:] == ["sft_data", "fine_tune"]  # generate is still complete; its output changed
    assert module._status("watermark", module._Run(profile, module.recipe_dir(profile), None))[0] == "changed"


def _quiet(line: str) -> None:
    pass


def _only_generate(module, monkeypatch, generate) -> None:
    """Replace the generate stage's runner (the real one is exercised by the smoke recipe below)."""
    monkeypatch.setattr(module, "_RUNNERS", {**module._RUNNERS, "generate": generate})


def test_a_stage_whose_work_stopped_early_is_not_complete_resumes_and_is_reported(tmp_path, monkeypatch, capsys):
    from alpaca_nb import cli
    from alpaca_nb import reproduce as module

    profile = load_profile("laptop", smoke=True)
    stop = module.StageOutcome(tokens=40, note="kept 3 from 5 requests", stopped_reason="stopped: the server exited",
                               done=3, of=8, unit="instructions kept")
    outcomes = [stop, stop, module.StageOutcome(note="kept 8 from 9 requests")]
    ran = []

    def generate(_run, folder):
        ran.append("generate")
        (folder / "generated.jsonl").write_text(f"run {len(ran)}")
        return outcomes[len(ran) - 1]

    _only_generate(module, monkeypatch, generate)
    with pytest.raises(module.StageStopped, match=r"generate stage stopped: the server exited, 3 of 8 instructions kept"):
        reproduce(profile, tmp_path, stages=["generate"], log=_quiet)
    assert not (tmp_path / "generate" / MANIFEST).is_file()  # not complete ...
    assert module._status("generate", module._Run(profile, tmp_path, None))[0] == "stopped"  # ... but resumable
    report = read_report(tmp_path)  # the report card is written before the error
    info = report["stages"]["generate"]
    assert (info["status"], info["stop_reason"], info["done"], info["of"], info["tokens"]) == (
        "stopped", "stopped: the server exited", 3, 8, 40)
    assert "| generate | stopped: the server exited, 3 of 8 instructions kept (rerun to resume); " in report_markdown(report)
    from alpaca_nb.reproduce import stages_frame

    assert stages_frame(report).loc["generate", "status"] == "stopped: the server exited, 3 of 8 instructions kept " \
                                                             "(rerun to resume)"
    assert report["metrics"] == [] and report["generation_funnel"] is None  # no figure from a stage that stopped

    # The command resumes it, stops again and exits non-zero; the next run resumes and finishes it.
    status = cli.main(["reproduce", "--profile", "laptop", "--smoke", "--out", str(tmp_path), "--stages", "generate"])
    assert status != 0 and "3 of 8 instructions kept" in capsys.readouterr().err
    lines: list[str] = []
    report = reproduce(profile, tmp_path, stages=["generate"], log=lines.append)
    assert f"generate: resuming in {tmp_path / 'generate'}" in lines and ran == ["generate"] * 3
    assert report["stages"]["generate"]["status"] == "complete" and not (tmp_path / "generate" / "stage-stopped.json").exists()


def test_the_generate_and_evaluate_runners_turn_an_early_stop_into_a_stopped_stage(tmp_path, monkeypatch):
    import contextlib

    from alpaca_nb import evaluate, judge, selfinstruct
    from alpaca_nb import reproduce as module

    profile = load_profile("laptop", smoke=True)
    run = module._Run(profile, tmp_path, None)
    reason = "stopped: 5 requests in a row failed after retries; the last: connection error"
    reports = {reason: selfinstruct.GenerationReport(tmp_path, kept=2, requests=5, stopped_reason=reason),
               "done": selfinstruct.GenerationReport(tmp_path, kept=1, requests=3,
                                                     stopped_reason="done: request limit reached")}
    monkeypatch.setattr(selfinstruct, "teacher_endpoint", lambda _profile: contextlib.nullcontext(None))
    for key, report in reports.items():
        monkeypatch.setattr(selfinstruct, "generate", lambda *args, report=report, **kwargs: report)
        outcome = module._generate(run, tmp_path)
        if key == "done":  # the profile's request limit: finished, with what it kept
            assert outcome.stopped_reason is None
        else:
            assert (outcome.stopped_reason, outcome.done, outcome.of) == (reason, 2, profile.generate_instructions)

    asked = {}
    judged = {"judge": "j", "stopped_reason": "stopped: the key was refused", "judged": 1, "pairs": 4}

    def run_evaluation(folder, system, **settings):
        asked.update(settings)
        return evaluate.EvaluationResults(system, "alpaca", [], [], [], {}, None, judged, {})

    monkeypatch.setattr(evaluate, "run_evaluation", run_evaluation)
    monkeypatch.setattr(judge, "judge_endpoint", lambda _profile: contextlib.nullcontext(None))
    monkeypatch.setattr(module, "_load_tuned", lambda _run: (None, None))
    outcome = module._evaluate(run, tmp_path)
    assert asked["probes"] == profile.eval_probes == 3  # the profile's probe count reaches the evaluation
    assert (outcome.stopped_reason, outcome.done, outcome.of) == ("stopped: the key was refused", 1, 4)


def test_a_stopped_stage_does_not_hold_back_the_stages_that_do_not_need_it(tmp_path, monkeypatch):
    from alpaca_nb import reproduce as module

    profile = load_profile("laptop", smoke=True)
    outputs = {"generate": "generated.jsonl", "sft_data": "training_data.json", "fine_tune": "run/final/model.bin"}
    ran = []

    def recorder(stage):
        def run(_run, folder):
            ran.append(stage)
            path = folder / outputs.get(stage, "result.json")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(stage)
            if stage == "evaluate":
                return module.StageOutcome(stopped_reason="stopped: the judge's budget", done=2, of=6, unit="pairs")
            return module.StageOutcome()
        return run

    monkeypatch.setattr(module, "_RUNNERS", {stage: recorder(stage) for stage in STAGES})
    with pytest.raises(module.StageStopped, match="evaluate stage stopped: the judge's budget, 2 of 6 pairs"):
        module.run_stages(profile, tmp_path, log=_quiet)
    assert ran == list(STAGES)  # the watermark needs only the fine-tune: it ran
    statuses = module._Run(profile, tmp_path, None)
    assert {stage: module._status(stage, statuses)[0] for stage in STAGES} == {
        **{stage: "complete" for stage in STAGES}, "evaluate": "stopped"}


def test_a_rerun_never_deletes_a_folder_it_did_not_make(tmp_path, monkeypatch):
    from alpaca_nb import reproduce as module

    profile = load_profile("laptop", smoke=True)
    ran = []

    def generate(_run, folder):
        ran.append(folder)
        (folder / "generated.jsonl").write_text(f"run {len(ran)}")
        return module.StageOutcome()

    _only_generate(module, monkeypatch, generate)
    users = tmp_path / "generate"
    users.mkdir()
    (users / "notes.txt").write_text("the user's own")
    with pytest.raises(StageError, match=rf"{users}: in the way of the generate stage, and not a stage folder"):
        reproduce(profile, tmp_path, stages=["generate"], log=_quiet)
    assert (users / "notes.txt").read_text() == "the user's own" and ran == []
    users.rename(tmp_path / "moved")
    reproduce(profile, tmp_path, stages=["generate"], log=_quiet)
    assert (tmp_path / "generate" / "stage-started.json").is_file()  # the marker: the folder is ours
    changed = replace(profile, generate_max_requests=profile.generate_max_requests + 1)
    lines: list[str] = []
    reproduce(changed, tmp_path, stages=["generate"], log=lines.append)  # ours, so a changed setting replaces it
    assert "generate: its inputs or settings changed since it ran: running it again" in lines and len(ran) == 2


def test_votes_live_outside_every_stage_folder_and_survive_a_rerun(tmp_path, monkeypatch):
    from alpaca_nb import reproduce as module
    from alpaca_nb.evaluate import blind_pairs, read_votes, record_vote, votes_file

    monkeypatch.setenv("ALPACA_NB_CACHE_DIR", str(tmp_path))
    profile = load_profile("laptop", smoke=True)
    outputs = {"generate": "generated.jsonl", "sft_data": "training_data.json", "fine_tune": "run/final/model.bin"}

    def recorder(stage):
        def run(_run, folder):
            path = folder / outputs.get(stage, "result.json")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{stage} at {time.time()}")
            return module.StageOutcome()
        return run

    monkeypatch.setattr(module, "_RUNNERS", {stage: recorder(stage) for stage in STAGES})
    module.ensure_stage(profile, "evaluate")
    item = SimpleNamespace(id="i1", instruction="Name a colour.", input="")
    pair = blind_pairs("ann", [item], ["Red."], ["Blue."], names=("tuned", "davinci"))[0]
    record_vote(votes_file(profile), "ann", pair, "A")
    assert module.recipe_dir(profile) not in votes_file(profile).parents
    (module.recipe_dir(profile) / "fine_tune" / "run" / "final" / "model.bin").write_text("a new fine-tune")
    module.ensure_stage(profile, "evaluate")  # evaluate's input changed: its folder is made afresh
    assert [vote.item for vote in read_votes(votes_file(profile))] == ["i1"]


def test_two_runs_of_one_stage_take_turns_under_its_lock(tmp_path, monkeypatch):
    import threading

    from alpaca_nb import reproduce as module

    profile = load_profile("laptop", smoke=True)
    release, ran = threading.Event(), []

    def generate(_run, folder):
        ran.append(folder)
        if len(ran) == 1:
            release.wait(30)  # the first run holds the stage until the test lets it go
        (folder / "generated.jsonl").write_text(f"run {len(ran)}")
        return module.StageOutcome()

    _only_generate(module, monkeypatch, generate)
    first_lines: list[str] = []
    second_lines: list[str] = []
    first = threading.Thread(target=module.run_stages, args=(profile, tmp_path, ["generate"]),
                             kwargs={"log": first_lines.append})
    second = threading.Thread(target=module.run_stages, args=(profile, tmp_path, ["generate"]),
                              kwargs={"log": second_lines.append})
    first.start()
    deadline = time.monotonic() + 10
    while not ran and time.monotonic() < deadline:
        time.sleep(0.02)
    second.start()
    while not any("waiting for it to finish" in line for line in second_lines) and time.monotonic() < deadline:
        time.sleep(0.02)
    waited = list(second_lines)
    release.set()
    first.join(30)
    second.join(30)
    assert any("another process is running this stage" in line for line in waited), second_lines
    assert len(ran) == 1 and f"generate: complete, skipped ({tmp_path / 'generate'})" in second_lines


def test_wall_time_sums_every_run_of_a_stage_a_killed_one_up_to_its_last_write(tmp_path, monkeypatch):
    from alpaca_nb import reproduce as module
    from alpaca_nb.jsonl import append_records

    profile = load_profile("laptop", smoke=True)
    calls = []

    def generate(_run, folder):
        calls.append(folder)
        time.sleep(0.3)
        if len(calls) == 1:
            raise RuntimeError("the teacher crashed")
        (folder / "generated.jsonl").write_text("done")
        return module.StageOutcome()

    _only_generate(module, monkeypatch, generate)
    with pytest.raises(RuntimeError, match="crashed"):
        module.run_stages(profile, tmp_path, ["generate"], log=_quiet)
    # A run SIGKILLed 50 s after it began: its start is on record, its end is not; its last write was at +50 s.
    killed_at = time.time()
    append_records(tmp_path / "generate" / "stage-segments.jsonl", [{"started": killed_at}])
    (tmp_path / "generate" / "partial.jsonl").write_text("{}\n")
    os.utime(tmp_path / "generate" / "partial.jsonl", (killed_at + 50, killed_at + 50))
    provenance = module.run_stages(profile, tmp_path, ["generate"], log=_quiet)["generate"]
    assert 50.6 <= provenance.wall_seconds < 53  # 0.3 s + the killed run's 50 s + 0.3 s


def test_training_tokens_per_second_counts_only_the_steps_the_last_run_trained():
    from alpaca_nb.reproduce import training_tokens_per_second

    # Resumed at step 6 of 8: global_step counts all 8, the run's 10 s trained 2 (batch 4, 100 tokens each).
    result = SimpleNamespace(elapsed_seconds=10.0, global_step=8, data_report=SimpleNamespace(total_tokens=1000, kept=10))
    assert training_tokens_per_second(result, 4, steps_this_run=2) == 2 * 4 * 100 / 10
    assert training_tokens_per_second(result, 4, steps_this_run=0) is None


def test_a_stage_may_spend_the_profiles_cap_within_what_is_left_of_the_runs_budget(tmp_path):
    from alpaca_nb.reproduce import _Run

    profile = load_profile("laptop")
    assert _Run(profile, tmp_path, None).remaining_budget(None) is None
    assert _Run(profile, tmp_path, None).remaining_budget(2.0) == 2.0
    assert _Run(profile, tmp_path, 1.0, spent_usd=0.25).remaining_budget(2.0) == 0.75
    assert _Run(profile, tmp_path, 1.0, spent_usd=0.25).remaining_budget(0.5) == 0.5
    assert _Run(profile, tmp_path, 1.0, spent_usd=3.0).remaining_budget(None) == 0.0


def test_values_are_printed_by_their_unit():
    assert format_value(0.5, "share") == "50.0%" and format_value(2.31441, "loss") == "2.314"
    assert format_value(52002, "count") == "52,002" and format_value(None, "share") == "not measured"
    assert format_value(0.0578, "usd") == "$0.06" and format_value(1.2e-05, "usd") == "$1.2e-05"


def test_read_report_refuses_another_schema(tmp_path):
    with pytest.raises(StageError, match="no report card"):
        read_report(tmp_path)
    (tmp_path / "report.json").write_text(json.dumps({"schema": REPORT_SCHEMA + 1}))
    with pytest.raises(StageError, match="report schema"):
        read_report(tmp_path)


# --------------------------------------------------------------------------- the whole smoke recipe


def _command(out: Path) -> list[str]:
    return [sys.executable, "-m", "alpaca_nb.cli", "reproduce", "--profile", "laptop", "--smoke", "--out", str(out)]


def _start(out: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "ALPACA_NB_PROGRESS": "0"}
    return subprocess.Popen(_command(out), stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def _kill_when(process: subprocess.Popen, ready, log: Path, timeout: float = 900) -> None:
    """SIGKILL the process group as soon as ``ready()`` holds; fail (with the log) if the run ends or hangs first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            pytest.fail(f"the run ended (exit {process.returncode}) before the kill point:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"the kill point never came:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


def _manifests(out: Path) -> dict[str, str]:
    return {stage: (out / stage / MANIFEST).read_text() for stage in STAGES if (out / stage / MANIFEST).is_file()}


def test_smoke_recipe_killed_inside_a_stage_and_between_stages_then_resumed(tmp_path):
    out = tmp_path / "run"
    # 1. Killed inside the fine-tune, once it has started training.
    log1 = tmp_path / "first.log"
    first = _start(out, log1)
    _kill_when(first, lambda: (out / "fine_tune" / "run").is_dir(), log1)
    after_first = _manifests(out)
    assert set(after_first) == {"generate", "sft_data"}, log1.read_text()[-2000:]

    # 2. The rerun skips the finished stages, resumes the fine-tune; killed just after the fine-tune finished.
    log2 = tmp_path / "second.log"
    second = _start(out, log2)
    _kill_when(second, lambda: (out / "fine_tune" / MANIFEST).is_file(), log2)
    text = log2.read_text()
    assert "generate: complete, skipped" in text and "sft_data: complete, skipped" in text
    assert "fine_tune: resuming" in text
    after_second = _manifests(out)
    assert {stage: after_second[stage] for stage in after_first} == after_first, "a finished stage was redone"

    # 3. The last rerun finishes without redoing anything finished, and writes the report card.
    finished = subprocess.run(_command(out), capture_output=True, text=True, timeout=1200, check=False,
                              env={**os.environ, "ALPACA_NB_PROGRESS": "0"})
    assert finished.returncode == 0, (finished.stdout + finished.stderr)[-3000:]
    for stage in ("generate", "sft_data", "fine_tune"):
        assert f"{stage}: complete, skipped" in finished.stdout
    final = _manifests(out)
    assert {stage: final[stage] for stage in after_second} == after_second, "a finished stage was redone"
    assert set(final) == set(STAGES)

    report = read_report(out)
    assert all(info["status"] == "complete" for info in report["stages"].values())
    metrics = {metric["key"]: metric for metric in report["metrics"]}
    from alpaca_nb.selfinstruct import load_run

    assert metrics["kept_instructions"]["ours"] == load_run(out / "generate").kept > 0
    assert metrics["held_out_loss_after"]["ours"] > 0 and "hallucination_rate" in metrics
    # (the smoke profile's 3 probes at 8 tokens may all be cut before they answer: then the rate is None, honestly)
    assert metrics["win_rate"]["paper"].startswith("50.3%")
    assert 0 <= metrics["watermark_detection"]["ours"] <= 1
    assert report["loss_curve"] and report["generation_funnel"]["generated blocks"] > 0
    sft = json.loads((out / "sft_data" / "mix.json").read_text())
    assert sft["generated"] + sft["real"] == 16  # the smoke profile's finetune_examples
    provenance = read_manifest(out / "generate")
    assert provenance.inputs["seed_tasks"] and provenance.settings["teacher_model"] == "smollm2-135m-instruct"
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "Metrics beside the paper" in html
    # What chapters 5 and 6 and the book's last page read back from the stages.
    from alpaca_nb.evaluate import read_evaluation
    from alpaca_nb.reproduce import metrics_frame, stages_frame
    from alpaca_nb.safety import EXPERIMENT_FILE, detection_table, read_experiment

    assert list(stages_frame(report)["status"]) == ["complete"] * len(STAGES)
    assert metrics_frame(report).loc[metrics["win_rate"]["label"], "the paper"].startswith("50.3%")
    experiment = read_experiment(out / "watermark" / EXPERIMENT_FILE)
    assert (detection_table(experiment).loc[max(experiment.z_marked), "detected (true positives)"]
            == metrics["watermark_detection"]["ours"])
    truthfulqa = read_evaluation(out / "evaluate").truthfulqa_result()
    assert truthfulqa.mc1 == metrics["truthfulqa_mc1"]["ours"] and len(truthfulqa.scores) == 2

    # 4. A changed setting reruns its stage, and the stages after it are reported out of date.
    changed = replace(load_profile("laptop", smoke=True), finetune_examples=12)
    lines: list[str] = []
    report = reproduce(changed, out, stages=["sft_data"], log=lines.append)
    assert "sft_data: its inputs or settings changed since it ran: running it again" in lines
    mix = json.loads((out / "sft_data" / "mix.json").read_text())
    assert mix["generated"] + mix["real"] == 12
    assert report["stages"]["generate"]["status"] == "complete"
    assert report["stages"]["fine_tune"]["status"] == "changed"
    assert {"held_out_loss_after", "win_rate"}.isdisjoint(metric["key"] for metric in report["metrics"])


def test_load_result_refuses_a_run_that_did_not_finish(tmp_path):
    from alpaca_nb.data import DataError
    from alpaca_nb.train import load_result

    with pytest.raises(DataError, match="the run did not finish"):
        load_result(tmp_path)
    (tmp_path / "loss_curve.json").write_text(json.dumps({"loss_curve": []}))
    with pytest.raises(DataError, match="not a loss_curve.json of this version"):
        load_result(tmp_path)


def test_the_report_withholds_the_win_rate_of_a_judge_that_disagrees_with_gpt4():
    from alpaca_nb.evaluate import win_rate
    from alpaca_nb.judge import Calibration
    from alpaca_nb.report_card import _judge_metrics
    from alpaca_nb.report_pages import _metric_row

    def judge(agree: int) -> dict:
        calibration = Calibration(16, agree / 16, (0.0, 1.0), 0.0, (0.0, 0.2), 0.5)
        return {"judge": "smollm2-135m-instruct", "calibration": asdict(calibration),
                "win_rate": asdict(win_rate(7, 5, 12))}

    weak = {metric["key"]: metric for metric in _judge_metrics(judge(1), win_rate(90, 89))}
    assert list(weak) == ["judge_agreement", "win_rate"]  # the agreement first: it says how to read the row
    assert weak["win_rate"]["ours"] is None and weak["win_rate"]["interval"] is None
    row = _metric_row(weak["win_rate"])
    assert row["ours"].startswith("judge not usable: agrees with GPT-4 on 6% of 16 pairs") and "%" not in row["95 % interval"]
    assert row["the paper"].startswith("50.3%")
    strong = {metric["key"]: metric for metric in _judge_metrics(judge(12), win_rate(90, 89))}
    assert strong["win_rate"]["ours"] == pytest.approx(win_rate(7, 5, 12).rate)
    assert _metric_row(strong["win_rate"])["ours"] == f"{win_rate(7, 5, 12).rate:.1%}"


def test_a_generate_stage_that_kept_nothing_leaves_an_empty_output_that_sft_data_mixes_from(tmp_path, monkeypatch):
    """A teacher that keeps no instruction (seen in the cluster rehearsal: a 135M model behind a chat API, 3
    requests) finishes the stage with an empty generated.jsonl; the mix is then all real records."""
    import contextlib

    from alpaca_nb import selfinstruct
    from alpaca_nb import reproduce as module

    profile = load_profile("laptop", smoke=True)
    run = module._Run(profile, tmp_path, None)
    report = selfinstruct.GenerationReport(tmp_path / "generate", kept=0, requests=3,
                                           stopped_reason="done: request limit reached")
    monkeypatch.setattr(selfinstruct, "teacher_endpoint", lambda _profile: contextlib.nullcontext(None))
    monkeypatch.setattr(selfinstruct, "generate", lambda *args, **kwargs: report)
    (tmp_path / "generate").mkdir()
    assert module._generate(run, tmp_path / "generate").stopped_reason is None
    assert (tmp_path / "generate" / "generated.jsonl").read_text() == ""
    (tmp_path / "sft_data").mkdir()
    module._sft_data(run, tmp_path / "sft_data")
    mix = json.loads((tmp_path / "sft_data" / "mix.json").read_text())
    assert mix["generated"] == 0 and mix["real"] == profile.finetune_examples
    assert module._inputs("sft_data", run)["generated.jsonl"] == file_sha256(tmp_path / "generate" / "generated.jsonl")
