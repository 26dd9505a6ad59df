"""The data a fine-tune trains on: chapter 4's mix (generated records topped up with real ones, the held-out real
records apart), as the ``sft_data`` stage writes and reads it, and the records a :class:`TrainConfig` names.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from alpaca_nb.data import AlpacaRecord, load_alpaca_data
from alpaca_nb.jsonl import write_text_atomically
from alpaca_nb.sft import DataMix, export_stanford_json, mix_records
from alpaca_nb.train_config import TrainConfig, TrainConfigError

__all__ = [
    "BookData", "book_training_data", "read_book_data", "training_records",
]

TRAINING_DATA_FILE = "training_data.json"  # the Stanford JSON a profile's fine-tune trains on ...
MIX_FILE = "mix.json"  # ... and how it was mixed (book_training_data, read_book_data)


@dataclass(frozen=True)
class BookData:
    """Chapter 4's training file: the data mix, then the held-out real records the run measures."""

    mix: DataMix
    held_out: tuple[AlpacaRecord, ...]
    path: Path  # Stanford JSON; TrainConfig holds out len(held_out) records from its end


def book_training_data(profile, generated: Sequence[Any], folder: str | os.PathLike) -> BookData:
    """Return chapter 4's data: ``generated`` (chapter 2's kept records) topped up with real ones from the
    profile's ``finetune_asset`` to ``finetune_examples``; the file's last ``finetune_eval_examples`` real
    records are held out and never mixed in."""
    real = load_alpaca_data(asset=profile.finetune_asset)
    if profile.finetune_eval_examples >= len(real):
        raise TrainConfigError(f"{profile.finetune_asset} has {len(real)} records: finetune_eval_examples="
                               f"{profile.finetune_eval_examples} would hold out all of them")
    split = len(real) - profile.finetune_eval_examples
    mix = mix_records(generated, real[:split], profile.finetune_examples, profile.finetune_asset)
    held_out = tuple(real[split:])
    path = export_stanford_json([*mix.records, *held_out], Path(folder) / TRAINING_DATA_FILE)
    write_text_atomically(Path(folder) / MIX_FILE, json.dumps({
        "summary": mix.summary(), "generated": mix.generated, "real": mix.real, "real_source": mix.real_source,
        "empty_outputs": mix.empty_outputs, "looping_outputs": mix.looping_outputs, "held_out": len(held_out)},
        indent=1) + "\n")
    return BookData(mix, held_out, path)


def read_book_data(folder: str | os.PathLike) -> BookData:
    """Return the data ``book_training_data`` wrote to ``folder`` (the recipe's ``sft_data`` stage)."""
    from alpaca_nb.data import DataError

    path, mix_path = Path(folder) / TRAINING_DATA_FILE, Path(folder) / MIX_FILE
    try:
        mix = json.loads(mix_path.read_text(encoding="utf-8"))
        records = load_alpaca_data(path)
        mixed = mix["generated"] + mix["real"]
        if mixed + mix["held_out"] != len(records):
            raise DataError(f"{path}: {len(records)} records, {mix_path} says {mixed} mixed + {mix['held_out']} held out")
        return BookData(DataMix(tuple(records[:mixed]), mix["generated"], mix["real"], mix["real_source"],
                                mix["empty_outputs"], mix["looping_outputs"]), tuple(records[mixed:]), path)
    except (OSError, json.JSONDecodeError, KeyError) as error:
        raise DataError(f"{folder}: not a finished training-data folder ({type(error).__name__}: {error})") from None


def training_records(config: TrainConfig) -> tuple[list, list]:
    """Return (training records, held-out records): up to ``n_examples`` from the start, ``n_eval_examples`` from the end."""
    as_path = Path(config.data).expanduser()
    if as_path.suffix == ".json" or as_path.is_file():
        records = load_alpaca_data(as_path)
    else:
        records = load_alpaca_data(asset=config.data)
    if config.n_eval_examples >= len(records):
        raise TrainConfigError(f"{config.data!r} has {len(records)} records: holding out n_eval_examples="
                               f"{config.n_eval_examples} would leave none to train on (--eval-examples)")
    held_out = records[len(records) - config.n_eval_examples:] if config.n_eval_examples > 0 else []
    training = records[:len(records) - len(held_out)]  # never overlaps the held-out records
    return (training if config.n_examples is None else training[:config.n_examples]), held_out
