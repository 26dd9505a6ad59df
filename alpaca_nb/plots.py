"""The chapters' charts, in one place: each takes a stage's results (a report, a table, an experiment) and returns
a matplotlib figure, computing only what the drawing needs (positions, error bars, a legend's AUC). The stage
modules re-export their charts. Chapter 1's charts and chapter 3's cost curve stay in ``seeds`` and
``api_costs``: they are drawn from those modules' own counts, and would import them back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

from alpaca_nb.selfinstruct_prompts import FILTER_REASONS
from alpaca_nb.stats import roc_auc

if TYPE_CHECKING:
    import pandas as pd

    from alpaca_nb.generation_runs import GenerationReport
    from alpaca_nb.safety import WatermarkExperiment
    from alpaca_nb.train import TrainResult

__all__ = [
    "plot_funnel", "plot_funnels", "plot_loss_curve", "plot_padding", "plot_rates_by_category",
    "plot_similarity_histograms", "plot_watermark", "plot_win_rates",
]


def plot_funnel(report: GenerationReport):
    """Return a bar chart of the funnel and the rejections by reason."""
    import matplotlib.pyplot as plt

    funnel = report.funnel()
    reasons = {reason: report.counters[reason] for reason in ("malformed", "truncated", *FILTER_REASONS, "near_duplicate")}
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 3.6), constrained_layout=True)
    left.bar(list(funnel), list(funnel.values()), color=["#8da0cb", "#8da0cb", "#66c2a5", "#1b9e77"])
    left.set_title("generation funnel")
    left.tick_params(axis="x", labelrotation=15)
    right.barh(list(reasons)[::-1], list(reasons.values())[::-1], color="#fc8d62")
    right.set_title("blocks lost, by reason")
    right.set_xlabel("blocks")
    return figure


def plot_funnels(reports: Mapping[str, GenerationReport]):
    """Return grouped bars, one group per funnel stage and one bar per run, each labelled with its count.

    The axis is logarithmic (with zero drawn at the bottom) so that a stage of 1 next to one of 100 stays visible.
    """
    import matplotlib.pyplot as plt

    stages = ["generated blocks", "parsed", "passed filters", "kept (not near-duplicates)"]
    figure, axis = plt.subplots(figsize=(11, 4), constrained_layout=True)
    width = 0.8 / max(1, len(reports))
    for index, (name, report) in enumerate(reports.items()):
        counts = [report.funnel()[stage] for stage in stages]
        positions = [stage + (index - (len(reports) - 1) / 2) * width for stage in range(len(stages))]
        bars = axis.bar(positions, [max(count, 0.8) for count in counts], width, label=name)
        axis.bar_label(bars, labels=[f"{count:,}" for count in counts], fontsize=8, padding=2)
    axis.set_yscale("log")
    axis.set_ylim(0.7, None)
    axis.set_xticks(range(len(stages)), stages)
    axis.set_ylabel("blocks (log scale)")
    axis.set_title("Where the generated blocks went, per way of asking (same prompts)")
    axis.legend(fontsize=8, loc="lower left")
    return figure


def plot_similarity_histograms(similarities: dict[str, Sequence[float]], threshold: float = 0.7):
    """Return overlaid histograms of max ROUGE-L similarity, with the rejection threshold marked."""
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.6), constrained_layout=True)
    bins = [step / 20 for step in range(21)]
    for name, values in similarities.items():
        if not values:  # nothing to draw; say so in the legend rather than divide by zero
            axis.plot([], [], " ", label=f"{name} (n=0)")
            continue
        axis.hist(values, bins=bins, alpha=0.55, density=True, label=f"{name} (n={len(values)})")
    axis.axvline(threshold, color="black", linestyle="--", label=f"rejected above {threshold}")
    axis.set_xlabel("ROUGE-L F against the most similar seed instruction")
    axis.set_ylabel("density")
    axis.legend()
    return figure


def plot_loss_curve(result: TrainResult):
    """Return a plot of the training loss per optimizer step, with the held-out loss before and after (chapter 4)."""
    import matplotlib.pyplot as plt

    steps, losses = zip(*result.loss_curve) if result.loss_curve else ((), ())
    figure, axis = plt.subplots(figsize=(7, 3.4), constrained_layout=True)
    axis.plot(steps, losses, marker="o", markersize=3, label="training loss (each step's batch)")
    if result.eval_loss_before is not None and result.eval_loss_after is not None:
        axis.plot([0, result.global_step], [result.eval_loss_before, result.eval_loss_after], marker="s",
                  linestyle="--", color="#d95f02", label=f"held-out loss ({result.eval_loss_before:.3f} -> "
                                                           f"{result.eval_loss_after:.3f})")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("cross-entropy on response tokens")
    axis.set_title(f"{'LoRA' if result.lora else 'full'} fine-tune, {result.world_size} process(es)")
    axis.legend(fontsize=8)
    return figure


def plot_win_rates(rates: dict[str, tuple[float, float, float]], title: str = "Win rate against text-davinci-003"):
    """Plot each labelled win rate (rate, low, high, as fractions) with its 95 % interval and the 50 % line."""
    import matplotlib.pyplot as plt

    labels = list(rates)
    figure, axes = plt.subplots(figsize=(7, 0.6 * len(labels) + 1.2))
    for row, label in enumerate(labels):
        rate, low, high = rates[label]
        axes.errorbar(rate, row, xerr=[[rate - low], [high - rate]], fmt="o", capsize=4, color="tab:blue")
    axes.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    axes.set_yticks(range(len(labels)), labels)
    axes.invert_yaxis()
    axes.set_xlim(0, 1)
    axes.set_xlabel("win rate (ties count one half), 95 % interval")
    axes.set_title(title)
    figure.tight_layout()
    return figure


def plot_rates_by_category(table: "pd.DataFrame"):
    """Plot the hallucination rate (wrong / answered) per category and system, a
    ``hallucination_table(by_category=True)``; a category with nothing answered has no bar."""
    import matplotlib.pyplot as plt
    import numpy as np

    systems = list(dict.fromkeys(table.index.get_level_values("system")))
    categories = list(dict.fromkeys(table.index.get_level_values("category")))
    width = 0.8 / len(systems)
    figure, axes = plt.subplots(figsize=(8, 3.5))
    for offset, system in enumerate(systems):
        rows = table.loc[system].reindex(categories)
        x = np.arange(len(categories)) + offset * width
        rate, low, high = (rows[column].astype(float).to_numpy()
                           for column in ("hallucination rate", "95% low", "95% high"))
        # No bar and no whisker where nothing was answered (NaN); clip rounding below zero.
        error = np.nan_to_num(np.array([rate - low, high - rate])).clip(min=0)
        axes.bar(x, rate, width, yerr=error, capsize=3, label=system)
    axes.set_xticks(np.arange(len(categories)) + width * (len(systems) - 1) / 2, categories)
    axes.set_ylim(0, 1)
    axes.set_ylabel("wrong / answered")
    axes.legend()
    figure.tight_layout()
    return figure


def plot_watermark(experiment: WatermarkExperiment):
    """Return a figure: the z-score distributions at the longest length, and the ROC curve at every length."""
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    longest = max(experiment.z_marked)
    figure, (histogram, roc) = plt.subplots(1, 2, figsize=(10, 3.6))
    histogram.hist(experiment.z_plain[longest], bins=20, alpha=0.6, label="plain")
    histogram.hist(experiment.z_marked[longest], bins=20, alpha=0.6, label="watermarked")
    histogram.axvline(experiment.threshold, color="black", linestyle="--", label=f"z = {experiment.threshold:g}")
    histogram.set(xlabel=f"z-score of the first {longest} tokens", ylabel="texts",
                  title="Detector z-scores")
    histogram.legend(loc="upper center")
    for length, marked in experiment.z_marked.items():
        plain = experiment.z_plain[length]
        false_positive, true_positive, _ = roc_curve([1] * len(marked) + [0] * len(plain), [*marked, *plain])
        roc.plot(false_positive, true_positive, label=f"{length} tokens (AUC {roc_auc(marked, plain):.3f})")
    roc.plot([0, 1], [0, 1], color="grey", linestyle=":")
    roc.set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC by text length")
    roc.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    return figure


def plot_padding(padding: "pd.DataFrame"):
    """Return a bar chart of real and padding tokens per strategy (a ``padding_by_strategy`` table)."""
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 2.6), constrained_layout=True)
    names = list(padding.index)[::-1]  # barh draws bottom-up: keep upstream on top
    real, pad = padding.loc[names, "real tokens"], padding.loc[names, "padding tokens"]
    axis.barh(names, real, color="#66c2a5", label="real tokens")
    axis.barh(names, pad, left=real, color="#d9d9d9", label="padding")
    for name in names:
        row = padding.loc[name]
        axis.annotate(f" {row['padding share']:.0%} padding", (row["computed tokens"], name), va="center", fontsize=8)
    axis.set_xlabel("tokens computed per epoch")
    axis.set_xlim(0, padding["computed tokens"].max() * 1.25)
    axis.legend(fontsize=8, loc="lower right")
    return figure
