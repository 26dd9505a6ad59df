"""Chapter 2's inspection of self-instruct's requests: one prompt's price, a request's mean tokens, and how similar
generated instructions are to the seed pool.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

from alpaca_nb.api_costs import count_tokens
from alpaca_nb.rouge import RougeLFilter
from alpaca_nb.selfinstruct_prompts import encode_completion, encode_prompt

__all__ = [
    "PromptPrice", "max_similarities", "price_prompt", "request_tokens",
]


@dataclass(frozen=True)
class PromptPrice:
    prompt: str
    prompt_tokens: int
    prompt_usd: float
    worst_case_usd: float  # prompt plus a full max_tokens completion


def price_prompt(seed_examples: Sequence[Any], model: str = "text-davinci-003", max_tokens: int = 3072,
                 template: str | None = None) -> PromptPrice:
    """Return the exact completion prompt for these seeds, its token count and its cost at ``model``'s prices."""
    from alpaca_nb.costs import price

    prompt = encode_prompt(seed_examples, template)
    tokens = count_tokens(prompt, model)
    rates = price(model)
    return PromptPrice(prompt, tokens, rates.cost(tokens, 0), rates.cost(tokens, max_tokens))


@dataclass(frozen=True)
class RequestTokens:
    prompt_tokens: float      # mean over sampled seed triples
    completion_tokens: float  # mean of a full completion of ``tasks_per_completion`` real tasks
    tasks_per_completion: int


def request_tokens(seed_tasks: Sequence[Any], written_tasks: Sequence[Any], model: str = "text-davinci-003",
                   samples: int = 50, seed: int = 0, tasks_per_completion: int = 16) -> RequestTokens:
    """Return the mean prompt and completion tokens of one upstream request, measured on real texts.

    Prompts sample three seeds as the generator does; completions are ``tasks_per_completion``
    real generated tasks in the upstream block format: tasks 4 to 19, since the stop sequence
    "\\n20" ends the list of 20 before its last task.
    """
    rng = random.Random(seed)
    prompts = [count_tokens(encode_prompt(rng.sample(list(seed_tasks), 3)), model) for _ in range(samples)]
    completions = [count_tokens(encode_completion(rng.sample(list(written_tasks), tasks_per_completion)), model)
                   for _ in range(samples)]
    return RequestTokens(sum(prompts) / samples, sum(completions) / samples, tasks_per_completion)


def max_similarities(texts: Sequence[str], pool: Sequence[str]) -> list[float]:
    """Return each text's exact ROUGE-L max similarity to ``pool`` (the pool does not grow)."""
    reference = RougeLFilter(pool)
    return [reference.max_similarity(text) for text in texts]
