"""Batching for supervised fine-tuning: upstream's right padding, length grouping, and padding-free packing.

Taught in chapter 4 (book/04_fine_tuning.md, "batches and padding"); ``benchmarks/bench_sft.py`` times them.
``AlpacaCollator`` is stanford_alpaca's collator; ``padding_free_collator`` packs a batch into one row, and
``enable_packed_attention`` makes packing pay on CPU too (attention per example instead of over the whole
row). ``padding_by_strategy`` and its plot count the padding each strategy computes on, without training.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Sequence

import torch
from transformers import AttentionInterface, DataCollatorWithFlattening, PreTrainedModel, PreTrainedTokenizerBase
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from alpaca_nb.plots import plot_padding
from alpaca_nb.sft import IGNORE_INDEX

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "PACKED_ATTENTION", "AlpacaCollator", "enable_packed_attention", "length_grouped_batches", "padded_tokens",
    "padding_by_strategy", "padding_free_collator", "plot_padding", "random_batches",
]


class AlpacaCollator:
    """Upstream's DataCollatorForSupervisedDataset: right padding to the longest example of the batch."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None):
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token: call ensure_pad_token(model, tokenizer) first")
        self.pad_token_id = tokenizer.pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Return input_ids (pad id), labels (-100) and attention_mask (0) padded on the right."""
        lengths = [len(feature["input_ids"]) for feature in features]
        width = self._padded_width(max(lengths))
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        # Built from the lengths, not from input_ids != pad id as upstream: when pad = EOS (SmolLM2), that
        # comparison would also hide each example's real EOS token.
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, (feature, length) in enumerate(zip(features, lengths)):
            input_ids[row, :length] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            labels[row, :length] = torch.as_tensor(feature["labels"], dtype=torch.long)
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

    def _padded_width(self, longest: int) -> int:
        multiple = self.pad_to_multiple_of
        return longest if not multiple else -(-longest // multiple) * multiple


def padding_free_collator() -> DataCollatorWithFlattening:
    """Return a collator packing a batch into one row with no padding and position ids restarting per example.

    Each example's first label becomes -100, so no token is trained to predict the next example's start.
    The model must get ``use_cache=False`` (``model.config.use_cache = False`` for Trainer): with a cache,
    transformers skips the packed-sequence mask and examples attend to the ones packed before them
    (``enable_packed_attention`` removes that trap and most of the attention cost).
    """
    return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)


PACKED_ATTENTION = "alpaca_packed_sdpa"


def _packed_segments(position_ids: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> list[int] | None:
    """Return the example lengths of one packed row (position ids restarting), or None for any other input."""
    if position_ids is None or query.shape[0] != 1 or query.shape[2] != key.shape[2] or query.shape[2] < 2:
        return None  # a padded batch, a decoding step with a cache, or a single token: plain SDPA handles it
    starts = [0] + (torch.nonzero(position_ids[0, 1:] != position_ids[0, :-1] + 1).flatten() + 1).tolist()
    if len(starts) == 1:
        return None
    return [end - start for start, end in zip(starts, starts[1:] + [query.shape[2]])]


def _packed_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Return (attention output, None): causal SDPA run per packed example, plain SDPA for anything else."""
    lengths = _packed_segments(kwargs.get("position_ids"), query, key)
    if lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # One L x L masked attention over the packed row costs (sum of lengths)^2; per example it costs the sum of
    # squares, and each call can use the causal kernel, which skips the blocks above the diagonal.
    outputs = [
        sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling, is_causal=True)[0]
        for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2))
    ]
    return torch.cat(outputs, dim=1), None


def enable_packed_attention(model: PreTrainedModel) -> PreTrainedModel:
    """Return ``model`` switched to attention computed per packed example (same results, far less work on CPU).

    With ``padding_free_collator`` the stock SDPA path attends over the whole packed row with a block-diagonal
    mask: its cost grows with the square of the row (8 examples of 200 tokens packed into 1,600 compute
    1,600² scores, 8 times the 8 x 200² that matter). This implementation splits the row where the position
    ids restart and runs causal SDPA on each example; padded batches and generation go through plain SDPA,
    unchanged. It also isolates the examples when a cache is present (the ``use_cache`` trap of
    ``padding_free_collator``). Measured by benchmarks/bench_sft.py: packed training steps 1.33x the
    upstream tokens/s with stock SDPA, 1.87x and 2.12x with this in two runs (chapter 4).
    """
    AttentionInterface.register(PACKED_ATTENTION, _packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)  # padded batches keep SDPA's usual mask
    model.set_attn_implementation(PACKED_ATTENTION)
    return model


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int = 0) -> list[list[int]]:
    """Return batches of indices of similar length, each index once, in shuffled order (longest batch first).

    As transformers' LengthGroupedSampler: shuffle, cut into mega-batches of ``50 * batch_size`` (fewer for
    small data, so there are about 4), sort each by length. The batch holding the longest example goes first
    so an out-of-memory error shows at step one, not hours later.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    generator = random.Random(seed)
    order = list(range(len(lengths)))
    generator.shuffle(order)
    megabatch_size = max(min(len(lengths) // (batch_size * 4), 50), 1) * batch_size
    batches = []
    for start in range(0, len(order), megabatch_size):
        megabatch = sorted(order[start:start + megabatch_size], key=lambda index: lengths[index], reverse=True)
        batches += [megabatch[i:i + batch_size] for i in range(0, len(megabatch), batch_size)]
    generator.shuffle(batches)
    if batches:
        longest = max(range(len(batches)), key=lambda b: max(lengths[index] for index in batches[b]))
        batches.insert(0, batches.pop(longest))
    return batches


def padding_by_strategy(lengths: Sequence[int], batch_size: int = 4, seed: int = 0) -> "pd.DataFrame":
    """Return, per batching strategy, the real, padding and computed tokens for examples of these lengths.

    Upstream: seeded random batches right-padded to their longest; length-grouped: ``length_grouped_batches``;
    padding-free: ``padding_free_collator``, which computes the real tokens only (chapter 4).
    """
    import pandas as pd

    upstream = random_batches(len(lengths), batch_size, seed=seed)
    grouped = length_grouped_batches(lengths, batch_size, seed=seed)
    real = sum(lengths)
    computed = {
        "upstream: random batches, right padding": padded_tokens(upstream, lengths),
        "length-grouped batches, right padding": padded_tokens(grouped, lengths),
        "padding-free packing": real,
    }
    return pd.DataFrame([{"strategy": name, "real tokens": real, "padding tokens": tokens - real,
                          "computed tokens": tokens, "padding share": (tokens - real) / tokens if tokens else 0.0}
                         for name, tokens in computed.items()]).set_index("strategy")


def random_batches(count: int, batch_size: int, seed: int = 0) -> list[list[int]]:
    """Return batches of indices 0..count-1 in a seeded random order: upstream's sampler (no length grouping)."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, count, batch_size)]


def padded_tokens(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> int:
    """Return the tokens computed when each batch is right-padded to its longest example."""
    return sum(max(lengths[index] for index in batch) * len(batch) for batch in batches if batch)
