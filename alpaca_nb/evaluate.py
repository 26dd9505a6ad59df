"""The evaluation stage: the systems' replies to the evaluation instructions, then probes, TruthfulQA, the judge.

Taught in chapter 5 (book/05_evaluation.md). ``generate_replies`` answers the evaluation instructions
(batched, cached on disk); ``run_evaluation`` / ``read_evaluation`` are ``alpaca-nb evaluate``. What the stage
and the chapter use lives beside it, each re-exported here: the release's "90 wins vs 89" and what such a
count can show (``win_rate``, ``comparisons_needed``: ``stats``), AlpacaEval's win rates recomputed from its
judgements (``alpaca_eval``), the blind human comparison behind chapter 5's widget (``blind_votes``), chapter
4's replies and where they stop (``stop_rates``) and the charts (``plots``). The LLM judge is ``judge``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from alpaca_nb.alpaca_eval import (
    LC_C_GRID, LC_FOLDS, AlpacaEvalWinRate, LengthControlledWinRate, alpaca_eval_table, alpaca_eval_win_rate,
    answer_lengths, length_controlled_win_rate,
)
from alpaca_nb.blind_votes import (
    CHOICES, Agreement, BlindPair, Vote, blind_pairs, next_pair, rater_agreement, read_votes, record_vote, tally,
    votes_file,
)
from alpaca_nb.data import DataError
from alpaca_nb.plots import plot_win_rates
from alpaca_nb.sft import instruction_text
from alpaca_nb.stats import (
    WinRate, comparisons_needed, fleiss_kappa, interval_from_standard_error, wilson_interval, win_rate,
)
from alpaca_nb.stop_rates import (
    Reply, answer_cap, answer_tokens, answers_over, greedy_completions, greedy_replies, invents_a_section,
    replies_table, stop_table,
)

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "Agreement",
    "AlpacaEvalWinRate",
    "BlindPair",
    "EvaluationResults",
    "LengthControlledWinRate",
    "Reply",
    "SystemReply",
    "Vote",
    "WinRate",
    "alpaca_eval_table",
    "alpaca_eval_win_rate",
    "answer_cap",
    "answer_lengths",
    "answer_tokens",
    "answers_over",
    "blind_pairs",
    "comparisons_needed",
    "fleiss_kappa",
    "generate_replies",
    "greedy_completions",
    "greedy_replies",
    "instruction_text",
    "interval_from_standard_error",
    "invents_a_section",
    "length_controlled_win_rate",
    "native_template",
    "next_pair",
    "plot_win_rates",
    "rater_agreement",
    "read_evaluation",
    "read_votes",
    "record_vote",
    "replies_side_by_side",
    "replies_table",
    "run_evaluation",
    "stop_table",
    "tally",
    "templated_prompts",
    "votes_file",
    "wilson_interval",
    "win_rate",
]


# --------------------------------------------------------------------------- replies

TEMPLATES = ("alpaca", "chat")


@dataclass(frozen=True)
class SystemReply:
    """One system's greedy reply to one instruction, with the prompt template it was asked through."""

    system: str
    instruction: str
    input: str
    output: str
    template: str  # "alpaca" (the fine-tuned format) or "chat" (the model's own chat template)
    stopped: bool | None  # the model ended the reply itself; None when an endpoint does not say
    max_new_tokens: int


def native_template(tokenizer: Any) -> str:
    """Return "chat" for a tokenizer with a chat template (an instruct model), else "alpaca"."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"


def replies_side_by_side(instructions: Sequence[Any], reference: Sequence[Any], reference_name: str,
                         replies: dict[str, Sequence[SystemReply]]) -> "pd.DataFrame":
    """Return a table: each instruction, the reference answer (a column named ``reference_name``), then each
    system's reply, marked where the token cap cut it."""
    import pandas as pd

    columns = {"instruction": [instruction_text(item.instruction, item.input) for item in instructions],
               reference_name: [answer.output for answer in reference[:len(instructions)]]}
    for system, texts in replies.items():
        columns[system] = [r.output if r.stopped is not False else f"{r.output} [cut at the token cap]"
                           for r in texts[:len(instructions)]]
    return pd.DataFrame(columns)


def _cache_key(system: str, source: str, template: str, max_new_tokens: int, instruction: str,
               input: str) -> str:  # noqa: A002
    # ``source`` names what answers (a weights fingerprint, or an endpoint): a system name alone would let a
    # changed base model or server reuse the old one's replies. Keys written before it was added simply miss.
    settings = {"system": system, "source": source, "template": template, "decoding": "greedy",
                "max_new_tokens": max_new_tokens, "instruction": instruction, "input": input}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


# Values sampled from each weight tensor for a model's fingerprint: enough to see any fine-tune, cheap for a 7B model.
_WEIGHT_SAMPLE = 4096


def _model_identity(model: Any, tokenizer: Any) -> str:
    """Return a fingerprint of what makes an in-process model's greedy replies: its class, config and generation
    config, its weights, and its tokenizer (class, vocabulary size, special tokens, chat template).

    The weights enter as an evenly strided sample of every tensor, with its name, shape and dtype: hashing every
    byte of a 7B model on each call would take minutes, and training changes every sampled tensor. Where the
    model was loaded from (``config._name_or_path``) is left out, so the same weights in a moved folder match.
    """
    import torch

    digest = hashlib.sha256()
    described = {"class": type(model).__name__, "tokenizer": type(tokenizer).__name__,
                 "vocabulary": len(tokenizer), "special_tokens": getattr(tokenizer, "special_tokens_map", None),
                 "chat_template": getattr(tokenizer, "chat_template", None)}
    for name in ("config", "generation_config"):
        settings = getattr(model, name, None)
        described[name] = {key: value for key, value in (settings.to_dict() if settings is not None else {}).items()
                           if key not in ("_name_or_path", "transformers_version")}
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.detach().reshape(-1)
            sample = flat[::max(1, flat.numel() // _WEIGHT_SAMPLE)][:_WEIGHT_SAMPLE]
            digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}".encode())
            digest.update(sample.to("cpu", torch.float64).numpy().tobytes())  # float64 holds any float exactly
    return f"model {digest.hexdigest()[:16]}"


def _endpoint_identity(endpoint: Any) -> str:
    """Return what names an endpoint's model: its base URL, model name and API."""
    return f"endpoint {endpoint.base_url or 'OpenAI'} {endpoint.model} {endpoint.api}"


def _cached_replies(cache: Path | None) -> dict[str, SystemReply]:
    from alpaca_nb.jsonl import read_records

    if cache is None:
        return {}
    replies = {}
    for number, record in read_records(cache):
        try:
            key = record.pop("key")
            replies[key] = SystemReply(**record)
        except (KeyError, TypeError) as error:
            raise DataError(f"{cache}, line {number}: not a reply record ({error}); the file is unchanged: "
                            "delete it to regenerate the replies") from None
    return replies


def templated_prompts(items: Sequence[Any], template: str, tokenizer: Any) -> list[str]:
    """Return each item's instruction (and input) as a prompt: the Alpaca template, or the tokenizer's chat template."""
    from alpaca_nb.sft import format_prompt

    if template == "alpaca":
        return [format_prompt(item.instruction, item.input) for item in items]
    return [tokenizer.apply_chat_template([{"role": "user", "content": instruction_text(item.instruction, item.input)}],
                                          tokenize=False, add_generation_prompt=True) for item in items]


def _model_replies(items, template, model, tokenizer, max_new_tokens, batch_size) -> list[tuple[str, bool | None]]:
    prompts = templated_prompts(items, template, tokenizer)
    replies = greedy_completions(model, tokenizer, prompts, max_new_tokens, batch_size,
                                 add_special_tokens=template == "alpaca", show_progress=False)
    return [(reply.text, reply.stopped) for reply in replies]


def _endpoint_replies(items, template, endpoint, max_new_tokens) -> list[tuple[str, bool | None]]:
    from alpaca_nb.sft import format_prompt

    replies = []
    for item in items:
        prompt = (format_prompt(item.instruction, item.input) if template == "alpaca"
                  else [{"role": "user", "content": instruction_text(item.instruction, item.input)}])
        completion = endpoint.complete(prompt, max_tokens=max_new_tokens, temperature=0.0)
        replies.append((completion.text.strip(), completion.finish_reason == "stop"))
    return replies


def generate_replies(system: str, instructions: Sequence[Any], *, template: str, model: Any = None,
                     tokenizer: Any = None, endpoint: Any = None, max_new_tokens: int = 256, batch_size: int = 8,
                     cache: str | os.PathLike | None = None) -> list[SystemReply]:
    """Return ``system``'s greedy reply to each instruction (objects with ``instruction`` and ``input``).

    The replies come from an in-process ``model`` and ``tokenizer`` (batched, left padding) or from an
    ``Endpoint``. ``template`` says how the instruction is asked: ``"alpaca"`` for a model tuned on the
    Alpaca template, ``"chat"`` for a chat model. With ``cache`` (a JSONL file), replies are kept there
    keyed by system, the model's identity (a fingerprint of its weights, config and tokenizer, or the
    endpoint's URL, model and API), template, decoding settings and instruction, so a rerun generates only what
    is missing, and a changed model never reuses another's replies.
    """
    from alpaca_nb.jsonl import append_records
    from alpaca_nb.progress import progress_bar

    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    if (endpoint is None) == (model is None):
        raise ValueError("pass either model and tokenizer, or endpoint")
    cache_path = Path(cache) if cache is not None else None
    known = _cached_replies(cache_path)
    source = _endpoint_identity(endpoint) if endpoint is not None else _model_identity(model, tokenizer)
    keys = [_cache_key(system, source, template, max_new_tokens, item.instruction, item.input) for item in instructions]
    missing = [(key, item) for key, item in zip(keys, instructions) if key not in known]
    bar = progress_bar(total=len(missing), desc=f"{system} replies", unit="reply")
    for start in range(0, len(missing), batch_size):
        chunk = missing[start:start + batch_size]
        items = [item for _, item in chunk]
        texts = (_endpoint_replies(items, template, endpoint, max_new_tokens) if endpoint is not None
                 else _model_replies(items, template, model, tokenizer, max_new_tokens, batch_size))
        fresh = {key: SystemReply(system, item.instruction, item.input, text, template, stopped, max_new_tokens)
                 for (key, item), (text, stopped) in zip(chunk, texts)}
        if cache_path is not None:
            append_records(cache_path, [{"key": key, **asdict(reply)} for key, reply in fresh.items()])
        known.update(fresh)
        bar.update(len(chunk))
    bar.close()
    return [known[key] for key in keys]


# --------------------------------------------------------------------------- the whole stage (``alpaca-nb evaluate``)

RESULTS_FILE = "results.json"


@dataclass(frozen=True)
class EvaluationResults:
    """One system's evaluation, as ``run_evaluation`` writes it and ``read_evaluation`` reads it back."""

    system: str
    template: str
    replies: list[SystemReply]  # to the user-oriented instructions, in their order
    reference_answers: list[str]  # text-davinci-003's real answers to the same instructions
    probe_replies: list[SystemReply]
    hallucination: dict[str, Any]  # hallucination.probe_summary: verdict counts, answered, rate (wrong / answered), ci
    truthfulqa: dict[str, Any] | None  # None for an endpoint (no log-likelihoods)
    judge: dict[str, Any] | None  # the judge's calibration and its verdicts against text-davinci-003
    lengths: dict[str, float]

    @property
    def stopped_reason(self) -> str | None:
        """Why the judge stopped before judging every pair (the budget, a refused key, a dead server, a failed
        call); None when it judged them all or there was no judge."""
        return (self.judge or {}).get("stopped_reason")

    def truthfulqa_result(self) -> Any:
        """Return the TruthfulQA scores as ``hallucination.truthfulqa_mc`` returned them (None for an endpoint)."""
        from alpaca_nb.hallucination import TruthfulQAResult, TruthfulQAScore

        t = self.truthfulqa
        if t is None:
            return None
        return TruthfulQAResult(tuple(TruthfulQAScore(**score) for score in t["scores"]), t["mc1"], tuple(t["mc1_ci"]),
                                t["mc2"], tuple(t["mc2_ci"]), t["of"])


def run_evaluation(out_dir: str | os.PathLike, system: str, *, template: str, model: Any = None, tokenizer: Any = None,
                   endpoint: Any = None, instructions: int = 16, max_new_tokens: int = 128, probes: int | None = None,
                   probe_max_new_tokens: int = 32, truthfulqa_questions: int | None = 200, judge: Any = None,
                   judge_calibration_pairs: int = 24, judge_budget_usd: float | None = None,
                   concurrency: int = 8) -> EvaluationResults:
    """Run chapter 5's evaluation of one system and write it to ``out_dir`` (replies cached, rerun-safe).

    Replies to the first ``instructions`` user-oriented instructions beside text-davinci-003's, the probe
    set's first ``probes`` (None: all) with hallucination rates, TruthfulQA MC1/MC2 (in-process models only),
    and, with a ``judge`` endpoint, the judge's calibration on AlpacaEval and its verdicts against
    text-davinci-003. A judge that stops early leaves ``stopped_reason`` set: the results cover a subset.
    """
    from alpaca_nb.data import load_alpaca_eval_annotations, load_davinci_eval_answers, load_eval_instructions
    from alpaca_nb.hallucination import load_probes, probe_summary, truthfulqa_mc
    from alpaca_nb.jsonl import write_text_atomically

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = dict(model=model, tokenizer=tokenizer, endpoint=endpoint, template=template, cache=out / "replies.jsonl")
    asked = load_eval_instructions()[:instructions]
    reference = load_davinci_eval_answers()[:instructions]
    replies = generate_replies(system, asked, max_new_tokens=max_new_tokens, **source)
    asked_probes = load_probes()[:probes]  # the first ones, as chapter 5 asks the model before the fine-tune
    probe_replies = generate_replies(system, asked_probes, max_new_tokens=probe_max_new_tokens, **source)
    hallucination = probe_summary(probe_replies, asked_probes)
    truthfulqa = None
    if model is not None:
        scored = truthfulqa_mc(model, tokenizer, limit=truthfulqa_questions)
        truthfulqa = {"questions": len(scored.scores), "of": scored.questions_of, "mc1": scored.mc1,
                      "mc1_ci": list(scored.mc1_ci), "mc2": scored.mc2, "mc2_ci": list(scored.mc2_ci),
                      "scores": [asdict(score) for score in scored.scores]}
    judged = None
    if judge is not None:
        judged = _judge_summary(judge, system, reference, replies, load_alpaca_eval_annotations(),
                                judge_calibration_pairs, out, judge_budget_usd, concurrency)
    lengths = answer_lengths({system: [r.output for r in replies]}).loc[system]
    results = EvaluationResults(system, template, replies, [a.output for a in reference], probe_replies, hallucination,
                                truthfulqa, judged, {"mean characters": float(lengths["mean characters"]),
                                                     "mean words": float(lengths["mean words"])})
    write_text_atomically(out / RESULTS_FILE, json.dumps(asdict(results), indent=1, ensure_ascii=False))
    return results


def _judge_summary(judge, system, reference, replies, annotations, calibration_count, out, budget_usd, concurrency):
    from alpaca_nb.judge import calibrate, calibration_pairs, judge_pairs, reply_pairs, verdict_records, verdict_win_rate

    options = dict(ledger_path=out / "ledger.jsonl", cache=out / "judgements.jsonl", budget_usd=budget_usd,
                   concurrency=concurrency)
    chosen = calibration_pairs(annotations, calibration_count)
    calibration_run = judge_pairs(judge, chosen, **options)
    verdict_run = judge_pairs(judge, reply_pairs(reference, replies, "text-davinci-003", system), **options)
    summary: dict[str, Any] = {"judge": judge.model, "stopped_reason": verdict_run.stopped_reason
                               or calibration_run.stopped_reason, "spent_usd": verdict_run.spent_usd,
                               # how far a stopped judge got: the stage reports "judged of pairs"
                               "judged": sum(v is not None for run in (calibration_run, verdict_run) for v in run.verdicts),
                               "pairs": len(calibration_run.verdicts) + len(verdict_run.verdicts)}
    if any(v is not None for v in calibration_run.verdicts):
        summary["calibration"] = asdict(calibrate(calibration_run.verdicts, chosen))
    if any(v is not None for v in verdict_run.verdicts):
        summary["win_rate"] = asdict(verdict_win_rate(verdict_run.verdicts))
    summary["verdicts"] = verdict_records(verdict_run.verdicts)
    return summary


def read_evaluation(out_dir: str | os.PathLike) -> EvaluationResults:
    """Return the evaluation ``run_evaluation`` wrote to ``out_dir`` (``results.json``)."""
    path = Path(out_dir) / RESULTS_FILE
    if not path.is_file():
        raise DataError(f"{path}: no such file; run `alpaca-nb evaluate --out {out_dir}` first")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        raw["replies"] = [SystemReply(**reply) for reply in raw["replies"]]
        raw["probe_replies"] = [SystemReply(**reply) for reply in raw["probe_replies"]]
        return EvaluationResults(**raw)
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise DataError(f"{path}: not an evaluation results file ({type(error).__name__}: {error})") from None
