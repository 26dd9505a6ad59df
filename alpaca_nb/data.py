"""Pinned upstream data: where each file comes from, how to find it, and typed loaders.

Taught in chapter 1 (book/01_seed_tasks.md). Resolution order for every asset:
explicit path -> ``$ALPACA_NB_DATA_DIR`` -> user cache (``$ALPACA_NB_CACHE_DIR`` or
``~/.cache/alpaca_nb``) -> verified download from a pinned upstream commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

from alpaca_nb.profiles import cache_dir, current_profile
from alpaca_nb.progress import progress_bar

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

STANFORD_ALPACA = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/761dc5bfbdeeffa89b8bff5d038781a4055f796a"
SELF_INSTRUCT = "https://raw.githubusercontent.com/yizhongw/self-instruct/0b26ccaa415992100fa32df62d41b994cf928e23"
TORCHTUNE = "https://raw.githubusercontent.com/pytorch/torchtune/bd2a0fc7c31430972728494fa01aaeeb0ebf1ba1"
LLAMA_FACTORY = "https://raw.githubusercontent.com/hiyouga/LLaMA-Factory/ff6d4d12eeb035d6ce06805a5733dd7b29f2ac30"
ALPACA_EVAL = "https://raw.githubusercontent.com/tatsu-lab/alpaca_eval/cd543a149df89434d8a54582c0151c0b945c3d20"
TRUTHFULQA = "https://raw.githubusercontent.com/sylinrl/TruthfulQA/f6be04e52bbcb41d4d20daee6358231d4a5015d2"
CC_BY_NC = "CC BY-NC 4.0 (Alpaca data)"
ALPACA_EVAL_LICENCE = f"Apache-2.0 (alpaca_eval); data {CC_BY_NC}"


class DataError(ValueError):
    """A data file is missing, unverifiable or malformed; the message names file, line and field."""


@dataclass(frozen=True)
class Asset:
    """One upstream file pinned to a commit, with the hash that proves it is that file."""

    name: str
    filename: str
    url: str | None  # None: a file derived from upstream files, with no upstream download of its own
    licence: str
    records: int | None
    description: str
    sha256: str | None = None
    git_blob: str | None = None  # sha1 of b"blob <len>\0" + data, for files with no published sha256


ASSETS: dict[str, Asset] = {
    asset.name: asset
    for asset in [
        Asset(
            "seed_tasks", "seed_tasks.jsonl", f"{STANFORD_ALPACA}/seed_tasks.jsonl",
            "Apache-2.0 (stanford_alpaca code); CC BY-NC 4.0 (stanford_alpaca DATA_LICENSE)", 175,
            "The 175 human-written self-instruct seed tasks.",
            sha256="7779004fa198fdf27cf70a159363879d8a26c53329e11b436af17b3941875f48",
            git_blob="c97d40d76abd45cd7456f2d0d58459bb4df3cad5",
        ),
        Asset(
            "prompt", "prompt.txt", f"{STANFORD_ALPACA}/prompt.txt",
            "Apache-2.0 (stanford_alpaca)", None,
            "The generation prompt Alpaca sent to text-davinci-003.",
            sha256="c042d2a46d3bdc4fa4406deeed5951dc2dcd4ebf29ebf8237210c384f09b5b2d",
            git_blob="8bdf51d2d893e4a6b584308e96c23f3a2257389c",
        ),
        Asset(
            "alpaca_data", "alpaca_data.json", f"{STANFORD_ALPACA}/alpaca_data.json",
            CC_BY_NC, 52002,
            "The full 52K Alpaca training set (text-davinci-003 outputs).",
            git_blob="3779ddbc040543ab1834ef216c983d6fcc06cc9a",
        ),
        Asset(
            "alpaca_sample", "alpaca_first100.json", f"{TORCHTUNE}/tests/assets/alpaca_tiny.json",
            f"BSD-3-Clause (torchtune); content {CC_BY_NC}", 100,
            "The first 100 records of the 52K Alpaca release, as kept in torchtune's test assets.",
            sha256="b1e3ff228aa9c61b524f85f859640fd07c0b94895047222dba6deec978afdfc0",
            git_blob="8a7180809d571d540cede007d6d3b89159932390",
        ),
        Asset(
            "alpaca_gpt4_demo", "alpaca_en_demo.json", f"{LLAMA_FACTORY}/data/alpaca_en_demo.json",
            f"Apache-2.0 (LLaMA-Factory); content {CC_BY_NC}", 999,
            "999 Alpaca instructions with GPT-4 outputs (not the original davinci targets).",
            sha256="bcc37c64db1a739a0789a1b81f251146fcf4459f903474bc9e3c21bbb5628318",
            git_blob="b645c416b5204f25fab66f839a44203a9ad5a2a4",
        ),
        Asset(
            "eval_instructions", "user_oriented_instructions.jsonl",
            f"{SELF_INSTRUCT}/human_eval/user_oriented_instructions.jsonl",
            "Apache-2.0 (self-instruct); its README asks that it not be used for training", 252,
            "The 252 user-oriented evaluation instructions of self-instruct.",
            sha256="81d60a117db495cecedecd9193504fd07c5b5a42f6699ef6b0f9da10fc22f42e",
            git_blob="ed6d5d986e3f4c65ff64d70328a2e1dab146f914",
        ),
        Asset(
            "davinci_eval_answers", "self_instruct_text-davinci-003_predictions.jsonl",
            f"{SELF_INSTRUCT}/human_eval/predictions/text-davinci-003_predictions.jsonl",
            "Apache-2.0 (self-instruct); evaluation only", 252,
            "text-davinci-003's real answers to the 252 user-oriented instructions, in their order.",
            sha256="9fbf9229c917f2c832399e4d474f0ed1a4f367fae61e5eee814f3db687e0d584",
            git_blob="46f4178c7a6b5dbe8b8005f43aac7c44e4626822",
        ),
        Asset(
            "alpaca_eval_alpaca_7b", "alpaca_eval_alpaca-7b_outputs.json",
            f"{ALPACA_EVAL}/results/alpaca-7b/model_outputs.json", ALPACA_EVAL_LICENCE, 805,
            "The released Alpaca-7B's answers to AlpacaEval's 805 instructions.",
            sha256="21048628f20187affc7d9c9e756d9618e08c4991fc8a48184612eb484565c5db",
            git_blob="d2215d7435178ad085c79086991f6a30286cc25b",
        ),
        Asset(
            "alpaca_eval_davinci_003", "alpaca_eval_text_davinci_003_outputs.json",
            f"{ALPACA_EVAL}/results/text_davinci_003/model_outputs.json", ALPACA_EVAL_LICENCE, 805,
            "text-davinci-003's answers to AlpacaEval's 805 instructions (AlpacaEval 1's reference).",
            sha256="af0bc112f08c88bf589bbfe6fc1036806d0a0f6fec9c4d5a4db860f5afe73b4b",
            git_blob="9b42638dd9c74a21adaaff9fed3de9f3f0f43ed2",
        ),
        Asset(
            "alpaca_eval_gpt4_annotations", "alpaca_eval_gpt4_annotations_alpaca-7b.json",
            f"{ALPACA_EVAL}/results/alpaca-7b/alpaca_eval_gpt4/annotations.json", ALPACA_EVAL_LICENCE, 805,
            "GPT-4's 805 pairwise judgements of text-davinci-003 (output_1) against Alpaca-7B (output_2).",
            sha256="d44ea50f1a81f6ae6a95e8ac1dd08b7eca82cc0a9058a2923b1c70cec1e9eaa5",
            git_blob="94acc5749aa3a2672777aaf1448b412f5e27ea45",
        ),
        Asset(
            "alpaca_eval_turbo_annotations", "alpaca_eval_turbo_annotations_vicuna-13b-v1.5_glm_preference.json",
            f"{ALPACA_EVAL}/results/vicuna-13b-v1.5/weighted_alpaca_eval_gpt4_turbo/weighted_alpaca_eval_gpt4_turbo/annotations.json",
            ALPACA_EVAL_LICENCE, 805,
            "GPT-4-turbo's soft judgements of gpt4_1106_preview (output_1) against vicuna-13b-v1.5 (AlpacaEval 2).",
            sha256="006353d44b04662232ff463ad4cf1de4ec73901a0544a521e2eb89905166f212",
            git_blob="234304d0a22181d179d919ced4d1f466d4e81316",
        ),
        Asset(
            "alpaca_eval_leaderboard", "alpaca_eval_gpt4_leaderboard.csv",
            f"{ALPACA_EVAL}/src/alpaca_eval/leaderboards/data_AlpacaEval/alpaca_eval_gpt4_leaderboard.csv",
            ALPACA_EVAL_LICENCE, None,
            "AlpacaEval 1's leaderboard (GPT-4 judge, text-davinci-003 reference): win rate, SE, LC.",
            sha256="9a86bb8cd16967ab94796ca6e52b63a14ceb59c953194ec064edfe690fb82ed6",
            git_blob="5f2acea5fe974fa1c84e90bd96effba78171b0dd",
        ),
        Asset(
            "instruction_difficulty", "alpaca_eval_instruction_difficulty.csv", None, ALPACA_EVAL_LICENCE, 805,
            "AlpacaEval's 805 instruction difficulties (length-controlled GLM), derived from the GPT-4-turbo "
            "annotations and vicuna-13b-v1.5's published fit (SOURCES.md); upstream keeps it on the HF hub only.",
            sha256="4942ecebe4025c99335d1f2ff73461dfc0e3b79e6aa4498de238cb95ce5cca1f",
        ),
        Asset(
            "truthfulqa", "TruthfulQA.csv", f"{TRUTHFULQA}/TruthfulQA.csv", "Apache-2.0 (TruthfulQA)", 790,
            "TruthfulQA's 790 questions with categories and true/false reference answers.",
            sha256="b8d8ef1e12f98b4f2a9f47abc9765da0640b182b6c5d9b92f0c1a1f2f1e02e5c",
            git_blob="4206d1e78db1b13612062ac816f6db0443d0e92b",
        ),
        Asset(
            "truthfulqa_mc", "TruthfulQA_mc_task.json", f"{TRUTHFULQA}/data/mc_task.json", "Apache-2.0 (TruthfulQA)", 790,
            "TruthfulQA's multiple-choice targets: MC1 (one true answer) and MC2 (several).",
            sha256="c90d853454fd48c676accb33e16923ac438dbb6fb37ecc7c6a70e33c9e556e87",
            git_blob="fbfbefb4b045739ffa7a4a6a695d96e77a0b68a5",
        ),
    ]
}

# The offline copies in a data dir may carry another name than the upstream file (SOURCES.md).
ALTERNATE_FILENAMES = {"alpaca_sample": ("alpaca_tiny_first100.json",), "alpaca_gpt4_demo": ("alpaca_en_demo_gpt4outputs.json",)}


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


# --------------------------------------------------------------------------- parsing


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if not data.strip():
        raise DataError(f"{path}: file is empty")
    try:
        return data.decode("utf-8-sig")  # a UTF-8 byte-order mark is tolerated
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: not valid UTF-8 (byte 0x{data[error.start]:02x} at offset {error.start})") from None


def jsonl_objects(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (location, object) for each non-blank line; location reads 'file, line N'.

    Lines end at "\n" only: JSON text may hold U+2028 and other characters str.splitlines breaks on.
    """
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(value, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(value).__name__}")
        yield where, value


def _json_list_objects(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (location, object) for each record of a JSON array; location names the record index."""
    try:
        value = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}, line {error.lineno}: invalid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type(value).__name__}")
    if not value:
        raise DataError(f"{path}: the array holds no records")
    for index, record in enumerate(value):
        where = f"{path}, record {index}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, record


def required_field(where: str, record: dict[str, Any], name: str, kind: type, *, allow_empty: bool = False) -> Any:
    """Return ``record[name]``, refusing a missing, mistyped or (unless ``allow_empty``) blank value with a
    DataError that names ``where`` (file and line) and the field."""
    if name not in record:
        raise DataError(f"{where}, field {name!r}: missing")
    value = record[name]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise DataError(f"{where}, field {name!r}: expected {kind.__name__}, got {type(value).__name__}")
    if not allow_empty and kind is str and not value.strip():
        raise DataError(f"{where}, field {name!r}: empty")
    return value


def _single_instance(where: str, record: dict[str, Any]) -> tuple[str, str]:
    instances = required_field(where, record, "instances", list)
    if not instances:
        raise DataError(f"{where}, field 'instances': empty")
    first = instances[0]
    if not isinstance(first, dict):
        raise DataError(f"{where}, field 'instances[0]': expected object, got {type(first).__name__}")
    inner = f"{where}, instances[0]"
    return required_field(inner, first, "input", str, allow_empty=True), required_field(inner, first, "output", str)


def _unique_ids(records: list, path: Path, locations: list[str]) -> None:
    seen: dict[str, str] = {}
    for record, where in zip(records, locations):
        if record.id in seen:
            raise DataError(f"{where}, field 'id': duplicate id {record.id!r} (first seen at {seen[record.id].split(', ', 1)[1]})")
        seen[record.id] = where


def _load_with_ids(path: Path, build: Callable[[str, dict[str, Any]], Any]) -> list:
    records, locations = [], []
    for where, raw in jsonl_objects(path):
        records.append(build(where, raw))
        locations.append(where)
    if not records:
        raise DataError(f"{path}: no records")
    _unique_ids(records, path, locations)
    return records


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
