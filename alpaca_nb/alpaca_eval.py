"""AlpacaEval's figures from its published outputs and GPT-4 judgements: the win rate against text-davinci-003,
its length-controlled version (the GLM that removes the judge's preference for longer answers, fitted with
scikit-learn's L1 logistic regression) and answer lengths. Taught in chapter 5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from alpaca_nb.data import PairwiseJudgement

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "AlpacaEvalWinRate", "LengthControlledWinRate", "alpaca_eval_table", "alpaca_eval_win_rate", "answer_lengths",
    "length_controlled_win_rate",
]


# AlpacaEval's length-controlled GLM: the C grid and fold count of src/alpaca_eval/metrics/glm_winrate.py.
LC_C_GRID = tuple(float(c) for c in np.logspace(-4, 4, 10))
LC_FOLDS = 5


@dataclass(frozen=True)
class AlpacaEvalWinRate:
    """AlpacaEval's win rate of output_2's system over output_1's (the reference), in percent."""

    model: str
    reference: str
    win_rate: float
    standard_error: float
    n_wins: int
    n_wins_base: int
    n_draws: int
    n_total: int
    n_missing: int


def _model_scores(annotations: list[PairwiseJudgement]) -> list[float | None]:
    """Per-example score of output_2: a soft preference p in [1, 2] scores p - 1; a draw (0) one half."""
    return [None if a.preference is None else 0.5 if a.preference == 0 else a.preference - 1 for a in annotations]


def _systems(annotations: list[PairwiseJudgement]) -> tuple[str, str]:
    if not annotations:
        raise ValueError("no annotations")
    pairs = {(a.generator_2, a.generator_1) for a in annotations}
    if len(pairs) != 1:
        raise ValueError(f"annotations compare several pairs of systems: {sorted(pairs)}; pass one pair at a time")
    return pairs.pop()


def alpaca_eval_win_rate(annotations: list[PairwiseJudgement]) -> AlpacaEvalWinRate:
    """Recompute the leaderboard's win rate and standard error exactly as AlpacaEval does.

    The win rate is the mean per-example score of output_2 (draw = 1/2), the standard error that
    mean's (ddof 1); an example with no judgement is dropped.
    """
    model, reference = _systems(annotations)
    scores = np.array([s for s in _model_scores(annotations) if s is not None])
    if len(scores) < 2:
        raise ValueError("a standard error needs at least two judged examples")
    return AlpacaEvalWinRate(
        model=model, reference=reference,
        win_rate=100 * float(scores.mean()),
        standard_error=100 * float(scores.std(ddof=1) / math.sqrt(len(scores))),
        n_wins=int((scores > 0.5).sum()), n_wins_base=int((scores < 0.5).sum()), n_draws=int((scores == 0.5).sum()),
        n_total=len(scores), n_missing=len(annotations) - len(scores))


@dataclass(frozen=True)
class LengthControlledWinRate:
    """AlpacaEval's length-controlled win rate: the GLM's win rate with the length difference set to zero."""

    model: str
    reference: str
    win_rate: float  # the raw win rate, percent
    length_controlled: float  # percent
    theta: float  # weight of tanh(standardised length difference)
    phi: float  # weight of the instruction difficulty
    psi: float  # the model's own strength
    C: float  # inverse L1 strength chosen by cross-validation
    n_total: int


def _lc_features(annotations: list[PairwiseJudgement], difficulty: dict[str, float]) -> np.ndarray:
    missing = [a.instruction for a in annotations if a.instruction not in difficulty]
    if missing:
        raise ValueError(f"{len(missing)} instructions have no difficulty, e.g. {missing[0][:60]!r}; "
                         f"the length-controlled GLM needs AlpacaEval's 805 instructions")
    delta = np.array([len(a.output_1) - len(a.output_2) for a in annotations], dtype=float)
    scaled = np.tanh(delta / delta.std(ddof=1))
    g = np.array([difficulty[a.instruction] for a in annotations])
    return np.column_stack([scaled, g, np.ones(len(annotations))])


def _soft_label_rows(features: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each example twice: label 1 weighted p, label 0 weighted 1 - p (how a soft preference is fitted)."""
    rows = np.vstack([features, features])
    labels = np.concatenate([np.ones(len(p)), np.zeros(len(p))])
    weights = np.concatenate([p, 1 - p])
    groups = np.concatenate([np.arange(len(p)), np.arange(len(p))])
    return rows, labels, weights, groups


def _l1_logistic(C: float):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, l1_ratio=1.0, solver="liblinear", fit_intercept=False, random_state=123)


def _cross_validated_C(rows, labels, weights, groups) -> float:
    from sklearn.metrics import log_loss
    from sklearn.model_selection import GroupKFold

    losses = []
    for C in LC_C_GRID:
        fold_losses = []
        for train, test in GroupKFold(n_splits=LC_FOLDS).split(rows, labels, groups):
            fit = _l1_logistic(C).fit(rows[train], labels[train], sample_weight=weights[train])
            fold_losses.append(log_loss(labels[test], fit.predict_proba(rows[test])[:, 1],
                                        sample_weight=weights[test], labels=[0, 1]))
        losses.append(np.mean(fold_losses))
    return LC_C_GRID[int(np.argmin(losses))]


def length_controlled_win_rate(annotations: list[PairwiseJudgement],
                               difficulty: dict[str, float]) -> LengthControlledWinRate:
    """Fit AlpacaEval's length-controlled GLM to one model's judgements and return its LC win rate.

    ``P(output_2 wins on i) = sigmoid(theta * tanh(s_i) + phi * g_i + psi)``, ``s_i`` the length
    difference (reference minus model, characters) over its standard deviation, ``g_i`` the
    instruction's difficulty; an L1 logistic fit without intercept (psi is the column of ones), C by
    5-fold cross-validation over ``logspace(-4, 4, 10)``. LC = mean of ``sigmoid(phi * g_i + psi)``.
    Upstream also adds judgements of two "gamed" baselines (lambda 0.2) that are not published on
    GitHub; without them the figure lands near, not on, the leaderboard's.
    """
    model, reference = _systems(annotations)
    judged = [a for a, s in zip(annotations, _model_scores(annotations)) if s is not None]
    p = np.array([s for s in _model_scores(judged)])
    rows, labels, weights, groups = _soft_label_rows(_lc_features(judged, difficulty), p)
    C = _cross_validated_C(rows, labels, weights, groups)
    theta, phi, psi = _l1_logistic(C).fit(rows, labels, sample_weight=weights).coef_[0]
    g = rows[: len(p), 1]
    length_controlled = 100 * float(np.mean(1 / (1 + np.exp(-(phi * g + psi)))))
    return LengthControlledWinRate(model=model, reference=reference, win_rate=100 * float(p.mean()),
                                   length_controlled=length_controlled, theta=float(theta), phi=float(phi),
                                   psi=float(psi), C=C, n_total=len(p))


def answer_lengths(answers: dict[str, list[str]]) -> "pd.DataFrame":
    """Return length statistics (characters and words) of each system's answers."""
    import pandas as pd

    rows = []
    for system, texts in answers.items():
        chars = np.array([len(text) for text in texts])
        words = np.array([len(text.split()) for text in texts])
        rows.append({"system": system, "answers": len(texts), "mean characters": chars.mean(),
                     "median characters": float(np.median(chars)), "mean words": words.mean(),
                     "empty": int((chars == 0).sum())})
    return pd.DataFrame(rows).set_index("system")


def alpaca_eval_table(raw: AlpacaEvalWinRate, lc: LengthControlledWinRate, published: Any) -> "pd.DataFrame":
    """Return the recomputed AlpacaEval figures beside the leaderboard's row (a ``data.LeaderboardRow``)."""
    import pandas as pd

    rows = {
        "win rate (%)": (raw.win_rate, published.win_rate),
        "standard error (points)": (raw.standard_error, published.standard_error),
        "wins / losses / draws": (f"{raw.n_wins} / {raw.n_wins_base} / {raw.n_draws}",
                                  f"{published.n_wins} / {published.n_wins_base} / {published.n_draws}"),
        "length-controlled win rate (%)": (lc.length_controlled, published.length_controlled_winrate),
    }
    return pd.DataFrame.from_dict(rows, orient="index", columns=["recomputed here", "leaderboard"])
