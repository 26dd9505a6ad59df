"""Pinned upstream data: how to find and verify each file, and typed loaders.

The pinned entries are ``assets``'; the strict reading of record files ``record_files``' (both re-exported).

Taught in chapter 1 (book/01_seed_tasks.md). Resolution order for every asset:
explicit path -> ``$ALPACA_NB_DATA_DIR`` -> user cache (``$ALPACA_NB_CACHE_DIR`` or
``~/.cache/alpaca_nb``) -> verified download from a pinned upstream commit.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx

from alpaca_nb.assets import (
    ALPACA_EVAL, ALPACA_EVAL_LICENCE, ALTERNATE_FILENAMES, ASSETS, CC_BY_NC, LLAMA_FACTORY, SELF_INSTRUCT,
    STANFORD_ALPACA, TORCHTUNE, TRUTHFULQA, Asset,
)
from alpaca_nb.profiles import cache_dir, current_profile
from alpaca_nb.progress import progress_bar
from alpaca_nb.record_files import (
    DataError, _json_list_objects, _load_with_ids, _read_text, _single_instance, jsonl_objects, required_field,
)

__all__ = [
    "ASSETS",
    "AlpacaRecord",
    "Asset",
    "DataError",
    "EvalInstruction",
    "LeaderboardRow",
    "PairwiseJudgement",
    "SeedTask",
    "SystemAnswer",
    "TruthfulQAQuestion",
    "cache_dir",
    "describe_assets",
    "download",
    "jsonl_objects",
    "load_alpaca_data",
    "load_alpaca_eval_annotations",
    "load_alpaca_eval_outputs",
    "load_davinci_eval_answers",
    "load_eval_instructions",
    "load_instruction_difficulty",
    "load_leaderboard",
    "load_prompt_template",
    "load_seed_tasks",
    "load_truthfulqa_mc",
    "offline",
    "required_field",
    "resolve",
]


@dataclass(frozen=True)
class SeedTask:
    id: str
    name: str
    instruction: str
    input: str
    output: str
    is_classification: bool


@dataclass(frozen=True)
class AlpacaRecord:
    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class EvalInstruction:
    id: str
    motivation_app: str
    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class SystemAnswer:
    """One system's answer to one evaluation instruction."""

    instruction: str
    input: str
    output: str
    generator: str


@dataclass(frozen=True)
class PairwiseJudgement:
    """One judge verdict in AlpacaEval's format: preference 1 = output_1 better, 2 = output_2, 0 = draw.

    Soft judges give a float in [1, 2]; ``None`` means the judge gave no verdict.
    """

    instruction: str
    output_1: str
    output_2: str
    generator_1: str
    generator_2: str
    preference: float | None


@dataclass(frozen=True)
class LeaderboardRow:
    model: str
    win_rate: float
    standard_error: float
    n_wins: int
    n_wins_base: int
    n_draws: int
    n_total: int
    avg_length: int
    length_controlled_winrate: float | None


@dataclass(frozen=True)
class TruthfulQAQuestion:
    """A TruthfulQA question with its MC1 (one true answer) and MC2 (several) targets: answer -> 1 true / 0 false."""

    question: str
    category: str
    mc1_targets: dict[str, int]
    mc2_targets: dict[str, int]


# --------------------------------------------------------------------------- locating files


def _data_dir() -> Path | None:
    value = os.environ.get("ALPACA_NB_DATA_DIR")
    return Path(value).expanduser() if value else None


def offline() -> bool:
    """Return True when ``ALPACA_NB_OFFLINE`` (or ``HF_HUB_OFFLINE``) forbids downloads."""
    return os.environ.get("ALPACA_NB_OFFLINE", "") not in ("", "0") or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


def _search_folders() -> list[Path]:
    return [folder for folder in (_data_dir(), cache_dir()) if folder is not None]


def _candidates(asset: Asset) -> list[Path]:
    names = (asset.filename, *ALTERNATE_FILENAMES.get(asset.name, ()))
    return [folder / name for folder in _search_folders() for name in names]


def git_blob_id(data: bytes) -> str:
    """Return git's blob id of ``data`` (what ``git hash-object`` prints)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def verify(asset: Asset, path: Path) -> None:
    """Raise DataError unless ``path`` holds exactly the pinned upstream bytes of ``asset``."""
    data = path.read_bytes()
    if asset.sha256 and hashlib.sha256(data).hexdigest() != asset.sha256:
        raise DataError(f"{path}: sha256 does not match the pinned {asset.name} ({asset.sha256}); "
                        f"this is not the upstream file. Remove it, or pass path= to use your own file on purpose.")
    if asset.git_blob and git_blob_id(data) != asset.git_blob:
        raise DataError(f"{path}: git blob id does not match the pinned {asset.name} ({asset.git_blob}); "
                        f"this is not the upstream file. Remove it, or pass path= to use your own file on purpose.")


def resolve(name: str, path: str | os.PathLike | None = None, *, allow_download: bool = True) -> Path:
    """Return a local path holding asset ``name``: explicit path, data dir, cache, then download."""
    if path is not None:
        explicit = Path(path).expanduser()
        if not explicit.is_file():
            raise DataError(f"{explicit}: no such file (explicit path given for {name})")
        return explicit
    asset = _asset(name)
    for candidate in _candidates(asset):
        if candidate.is_file():
            verify(asset, candidate)
            return candidate
    looked = ", ".join(str(folder) for folder in _search_folders())
    if asset.url is None:
        raise DataError(f"{asset.filename} ({name}) not found; looked in: {looked}. It is derived from upstream files "
                        f"and has no upstream download: put it in $ALPACA_NB_DATA_DIR or pass path= ({asset.description})")
    how = (f"Provide it with path=..., or put {asset.filename} in $ALPACA_NB_DATA_DIR, "
           f"or let alpaca_nb download it from {asset.url}")
    if not allow_download or offline():
        raise DataError(f"{asset.filename} ({name}) not found; looked in: {looked}; "
                        f"downloads are off. {how}.")
    try:
        return download(asset, cache_dir())
    except DataError as error:
        raise DataError(f"{asset.filename} ({name}) not found; looked in: {looked}; the download failed: {error}. {how}.") from error


def _asset(name: str) -> Asset:
    try:
        return ASSETS[name]
    except KeyError:
        raise DataError(f"unknown asset {name!r}; known assets: {', '.join(sorted(ASSETS))}") from None


def download(asset: Asset, dest_dir: Path, url: str | None = None, timeout: float = 60.0) -> Path:
    """Download ``asset`` into ``dest_dir`` with a progress bar, verify its hash, return its path.

    The bytes land in a temporary file first: a failed or mismatching download leaves nothing
    behind, so a later run never mistakes a partial file for the real one.
    """
    url = url or asset.url
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / asset.filename
    partial = dest_dir / f".{asset.filename}.part"
    try:
        with httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as response:
            if response.status_code != 200:
                raise DataError(f"GET {url} answered HTTP {response.status_code}")
            total = int(response.headers.get("content-length") or 0) or None
            with partial.open("wb") as out, \
                    progress_bar(total=total, unit="B", unit_scale=True, desc=asset.filename) as bar:
                for chunk in response.iter_bytes():
                    out.write(chunk)
                    bar.update(len(chunk))
        verify(asset, partial)
    except httpx.HTTPError as error:
        partial.unlink(missing_ok=True)
        raise DataError(f"GET {url} failed: {type(error).__name__}: {error}") from error
    except DataError:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, target)
    return target


# --------------------------------------------------------------------------- loaders


def load_seed_tasks(path: str | os.PathLike | None = None) -> list[SeedTask]:
    """Return the 175 self-instruct seed tasks (one instance each) as SeedTask records."""

    def build(where: str, raw: dict[str, Any]) -> SeedTask:
        task_input, output = _single_instance(where, raw)
        return SeedTask(
            id=required_field(where, raw, "id", str),
            name=required_field(where, raw, "name", str),
            instruction=required_field(where, raw, "instruction", str),
            input=task_input,
            output=output,
            is_classification=required_field(where, raw, "is_classification", bool),
        )

    return _load_with_ids(resolve("seed_tasks", path), build)


def load_eval_instructions(path: str | os.PathLike | None = None) -> list[EvalInstruction]:
    """Return the 252 user-oriented evaluation instructions of self-instruct (chapter 5)."""

    def build(where: str, raw: dict[str, Any]) -> EvalInstruction:
        task_input, output = _single_instance(where, raw)
        return EvalInstruction(
            id=required_field(where, raw, "id", str),
            motivation_app=required_field(where, raw, "motivation_app", str),
            instruction=required_field(where, raw, "instruction", str),
            input=task_input,
            output=output,
        )

    return _load_with_ids(resolve("eval_instructions", path), build)


def load_alpaca_data(
    path: str | os.PathLike | None = None, *, asset: str | None = None, allow_empty_output: bool | None = None
) -> list[AlpacaRecord]:
    """Return Alpaca records (instruction, input, output) from a JSON array file.

    With no path, ``asset`` picks the pinned file (default: the active profile's choice,
    ``alpaca_sample`` on a laptop, the full ``alpaca_data`` on a cluster). An empty output is an
    error, except in the pinned 52K file, where 28 are a known upstream defect
    (stanford_alpaca#265): those records are kept and counted in a warning, never dropped.
    """
    if path is None and asset is None:
        asset = current_profile().alpaca_asset
    source = resolve(asset, None) if path is None else resolve("alpaca_data", path)
    if allow_empty_output is None:
        allow_empty_output = path is None and asset == "alpaca_data"
    records = [
        AlpacaRecord(
            instruction=required_field(where, raw, "instruction", str),
            input=required_field(where, raw, "input", str, allow_empty=True),
            output=required_field(where, raw, "output", str, allow_empty=allow_empty_output),
        )
        for where, raw in _json_list_objects(source)
    ]
    empty = sum(1 for record in records if not record.output.strip())
    if empty:
        warnings.warn(f"{source}: {empty} records have an empty output (upstream defect, stanford_alpaca#265); kept as they are",
                      stacklevel=2)
    return records


def load_prompt_template(path: str | os.PathLike | None = None) -> str:
    """Return the text of upstream prompt.txt, the self-instruct generation prompt (chapter 2)."""
    return _read_text(resolve("prompt", path))


def load_davinci_eval_answers(path: str | os.PathLike | None = None,
                              instructions: list[EvalInstruction] | None = None) -> list[SystemAnswer]:
    """Return text-davinci-003's real answers to the 252 user-oriented instructions, in their order.

    Each line must carry the instruction of the same line of ``user_oriented_instructions.jsonl``
    (loaded unless given), so a reordered or truncated file is refused rather than mispaired.
    """
    source = resolve("davinci_eval_answers", path)
    instructions = instructions if instructions is not None else load_eval_instructions()
    answers = []
    for where, raw in jsonl_objects(source):
        index = len(answers)
        if index >= len(instructions):
            raise DataError(f"{where}: more answers than the {len(instructions)} evaluation instructions")
        expected = instructions[index]
        instruction = required_field(where, raw, "instruction", str)
        if instruction.strip() != expected.instruction.strip():
            raise DataError(f"{where}, field 'instruction': does not match instruction {index} ({expected.id}); "
                            f"the answers must follow the order of user_oriented_instructions.jsonl")
        answers.append(SystemAnswer(instruction=expected.instruction, input=expected.input,
                                    output=required_field(where, raw, "response", str, allow_empty=True),
                                    generator="text-davinci-003"))
    if len(answers) != len(instructions):
        raise DataError(f"{source}: {len(answers)} answers for {len(instructions)} evaluation instructions")
    return answers


def load_alpaca_eval_outputs(asset: str = "alpaca_eval_alpaca_7b",
                             path: str | os.PathLike | None = None) -> list[SystemAnswer]:
    """Return a system's answers in AlpacaEval's model_outputs.json format (instruction, output, generator)."""
    source = resolve(asset, path)
    return [SystemAnswer(instruction=required_field(where, raw, "instruction", str), input="",
                         output=required_field(where, raw, "output", str, allow_empty=True),
                         generator=required_field(where, raw, "generator", str))
            for where, raw in _json_list_objects(source)]


def load_alpaca_eval_annotations(asset: str = "alpaca_eval_gpt4_annotations",
                                 path: str | os.PathLike | None = None) -> list[PairwiseJudgement]:
    """Return pairwise judgements in AlpacaEval's annotations.json format, any judge, any pair of systems."""
    source = resolve(asset, path)
    return [PairwiseJudgement(instruction=required_field(where, raw, "instruction", str),
                              output_1=required_field(where, raw, "output_1", str, allow_empty=True),
                              output_2=required_field(where, raw, "output_2", str, allow_empty=True),
                              generator_1=required_field(where, raw, "generator_1", str),
                              generator_2=required_field(where, raw, "generator_2", str),
                              preference=_preference(where, raw))
            for where, raw in _json_list_objects(source)]


def _preference(where: str, raw: dict[str, Any]) -> float | None:
    if "preference" not in raw:
        raise DataError(f"{where}, field 'preference': missing")
    value = raw["preference"]
    if value is None:
        return None
    number = _number(where, "preference", value)
    if number != 0 and not 1 <= number <= 2:
        raise DataError(f"{where}, field 'preference': {value!r} is neither 0 (draw) nor in [1, 2]")
    return number


def _number(where: str, name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise DataError(f"{where}, field {name!r}: expected a number, got bool")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}, field {name!r}: expected a number, got {value!r}") from None
    if number != number:  # NaN
        raise DataError(f"{where}, field {name!r}: not a number (NaN)")
    return number


def _csv_rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[str, dict[str, str]]]:
    """Yield (location, row) for each CSV row; location reads 'file, line N' (the header is line 1)."""
    import csv
    import io

    reader = csv.DictReader(io.StringIO(_read_text(path)))
    missing = [name for name in required if name not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{path}, line 1: missing column(s) {', '.join(missing)}")
    for row in reader:
        yield f"{path}, line {reader.line_num}", row


def load_leaderboard(path: str | os.PathLike | None = None) -> dict[str, LeaderboardRow]:
    """Return AlpacaEval 1's leaderboard, model name -> its published figures."""
    source = resolve("alpaca_eval_leaderboard", path)
    columns = ("win_rate", "standard_error", "n_wins", "n_wins_base", "n_draws", "n_total", "avg_length")
    board = {}
    for where, row in _csv_rows(source, ("", *columns)):
        numbers = {name: _number(where, name, row[name]) for name in columns}
        lc = row.get("length_controlled_winrate") or None
        board[row[""]] = LeaderboardRow(
            model=row[""], win_rate=numbers["win_rate"], standard_error=numbers["standard_error"],
            n_wins=int(numbers["n_wins"]), n_wins_base=int(numbers["n_wins_base"]), n_draws=int(numbers["n_draws"]),
            n_total=int(numbers["n_total"]), avg_length=int(numbers["avg_length"]),
            length_controlled_winrate=None if lc is None else _number(where, "length_controlled_winrate", lc))
    return board


def load_instruction_difficulty(path: str | os.PathLike | None = None) -> dict[str, float]:
    """Return AlpacaEval's instruction difficulty g per instruction (the length-controlled GLM's input)."""
    source = resolve("instruction_difficulty", path)
    return {row["instruction"]: _number(where, "instruction_difficulty", row["instruction_difficulty"])
            for where, row in _csv_rows(source, ("instruction", "instruction_difficulty"))}


def load_truthfulqa_mc(path: str | os.PathLike | None = None,
                       questions_csv: str | os.PathLike | None = None) -> list[TruthfulQAQuestion]:
    """Return TruthfulQA's 790 multiple-choice questions, each with its category from TruthfulQA.csv."""
    source = resolve("truthfulqa_mc", path)
    categories = {row["Question"].strip(): row["Category"]
                  for _, row in _csv_rows(resolve("truthfulqa", questions_csv), ("Question", "Category"))}
    questions = []
    for where, raw in _json_list_objects(source):
        question = required_field(where, raw, "question", str)
        mc1, mc2 = _targets(where, raw, "mc1_targets"), _targets(where, raw, "mc2_targets")
        if sum(mc1.values()) != 1:
            raise DataError(f"{where}, field 'mc1_targets': {sum(mc1.values())} true answers; MC1 needs exactly one")
        if not 0 < sum(mc2.values()) < len(mc2):
            raise DataError(f"{where}, field 'mc2_targets': needs both true and false answers")
        questions.append(TruthfulQAQuestion(question=question, category=categories.get(question.strip(), "unknown"),
                                            mc1_targets=mc1, mc2_targets=mc2))
    return questions


def _targets(where: str, raw: dict[str, Any], name: str) -> dict[str, int]:
    targets = required_field(where, raw, name, dict)
    if len(targets) < 2:
        raise DataError(f"{where}, field {name!r}: needs at least two answers")
    for answer, label in targets.items():
        if label not in (0, 1) or isinstance(label, bool):
            raise DataError(f"{where}, field {name!r}: answer {answer[:40]!r} has label {label!r}, expected 1 or 0")
    return targets


def describe_assets(names: list[str] | None = None) -> "pd.DataFrame":
    """Return a table of the pinned assets: records, licence, and the pinned URL (all assets by default)."""
    import pandas as pd

    chosen = [_asset(name) for name in (names or list(ASSETS))]
    return pd.DataFrame([{"asset": a.name, "records": a.records, "licence": a.licence,
                          "pinned source": a.url or "derived (SOURCES.md)"} for a in chosen])
