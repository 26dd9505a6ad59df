"""The report card's pages: ``report.md`` and ``report.html``, the tables and figures chapter 7 shows, from the
``report.json`` content that ``report_card`` builds.
"""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alpaca_nb.claims import SOURCE_URL
from alpaca_nb.jsonl import write_text_atomically

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "REPORT_FIGURES", "environment_lines", "format_value", "metrics_frame", "report_figure", "report_figures",
    "report_html", "report_markdown", "stages_frame", "write_report",
]


def format_value(value: float | None, unit: str) -> str:
    """Return a metric's value as the report prints it, by its unit."""
    if value is None:
        return "not measured"
    return {"count": f"{value:,.0f}", "share": f"{value:.1%}", "loss": f"{value:.3f}", "usd": f"${value:,.2f}" if value >= 0.01 or value == 0 else f"${value:.2g}",
            "hours": f"{value:.3f} h", "tokens/s": f"{value:,.0f}"}[unit]


_STATUS_WORDS = {"new": "not run", "interrupted": "interrupted (rerun to resume)",
                 "changed": "out of date (its inputs changed)", "waiting": "waiting for an earlier stage"}


def _status_words(info: dict[str, Any]) -> str:
    """Return a stage's status as the report prints it; a stopped one with its reason and the count done."""
    if info["status"] == "stopped":
        count = "" if info["done"] is None else f", {info['done']:,} of {info['of']:,} {info['unit']}"
        return f"{info['stop_reason']}{count} (rerun to resume)"
    return _STATUS_WORDS.get(info["status"], info["status"])


def report_markdown(report: dict[str, Any]) -> str:
    """Return the report card as Markdown: stages (time, tokens, dollars), metrics beside the paper, environment."""
    kind = "smoke-size " if report["smoke"] else ""
    stand_ins = report.get("stand_ins") or {}
    overlaid = f" with stand-ins for {', '.join(stand_ins)}" if stand_ins else ""
    lines = [f"# Alpaca reproduced: report card ({report['profile']} profile{overlaid}, {kind}run)", "",
             f"Written {report['created']}. The paper's figures are the release's ({SOURCE_URL}); ours come from "
             "this run" + (" of the embedded 135M model, offline: not comparable in size to LLaMA-7B" if
                           report["profile"] == "laptop" else "") + ".", "",
             *([f"Stand-ins (set by ALPACA_NB_<SETTING> variables): "
                f"{'; '.join(f'{key} = {value}' for key, value in stand_ins.items())}.", ""] if stand_ins else []),
             "## Stages", "", "| stage | wall time | tokens | dollars spent | at the paper's 2023 rates | note |",
             "|---|---|---|---|---|---|"]
    for stage, info in report["stages"].items():
        if info["status"] == "stopped":
            tokens = "" if info["tokens"] is None else f"{info['tokens']:,}"
            lines.append(f"| {stage} | {_status_words(info)}; {info['wall_seconds']:.0f} s so far | {tokens} | "
                         f"{format_value(info['usd'], 'usd')} | | {info['note']} |")
            continue
        if info["status"] != "complete":
            lines.append(f"| {stage} | {_status_words(info)} | | | | |")
            continue
        paper_rates = "" if info["usd_paper_rates"] is None else format_value(info["usd_paper_rates"], "usd")
        tokens = "" if info["tokens"] is None else f"{info['tokens']:,}"
        lines.append(f"| {stage} | {info['wall_seconds']:.0f} s | {tokens} | {format_value(info['usd'], 'usd')} | {paper_rates} | "
                     f"{info['note']} |")
    lines += ["", "## Metrics beside the paper", "", "| metric | ours | 95 % interval | the paper |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(_metric_row(metric).values()) + " |" for metric in report["metrics"]]
    lines += ["", "## Environment", "", *(f"- {line}" for line in environment_lines(report["environment"])), ""]
    return "\n".join(lines)


def environment_lines(env: dict[str, Any]) -> list[str]:
    """Return the report's environment as lines of text: profile and commit, python, CPU and GPU, packages."""
    packages = ", ".join(f"{name} {ver}" for name, ver in env["packages"].items() if ver)
    return [f"profile: {env['profile']}; git commit: {env['git_commit'] or 'not a checkout'}",
            f"python {env['python']} on {env['platform']}",
            f"CPU: {env['cpu']} ({env['cpu_count']} cores); GPU: {env['gpu'] or 'none'}", f"packages: {packages}"]


def stages_frame(report: dict[str, Any]) -> "pd.DataFrame":
    """Return the report's stages as a table: status, wall time, tokens, dollars spent and at the paper's rates."""
    import pandas as pd

    rows = {}
    for stage, info in report["stages"].items():
        complete = info["status"] == "complete"
        ran = complete or info["status"] == "stopped"  # a stopped stage has its time, tokens and dollars so far
        rows[stage] = {
            "status": "complete" if complete else _status_words(info),
            "wall time": f"{info['wall_seconds']:.0f} s" if ran else "",
            "tokens": f"{info['tokens']:,}" if ran and info["tokens"] is not None else "",
            "dollars spent": format_value(info["usd"], "usd") if ran else "",
            "at the paper's 2023 rates": format_value(info["usd_paper_rates"], "usd")
            if complete and info["usd_paper_rates"] is not None else "",
            "note": info.get("note", ""),
        }
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("stage")


def metrics_frame(report: dict[str, Any]) -> "pd.DataFrame":
    """Return the report's metrics as a table: ours (with its 95 % interval) beside the paper's figure."""
    import pandas as pd

    rows = [_metric_row(metric) for metric in report["metrics"]]
    return pd.DataFrame(rows, columns=["metric", "ours", "95 % interval", "the paper"]).set_index("metric")


def _metric_row(metric: dict[str, Any]) -> dict[str, str]:
    """Return one metric as the report's table shows it: label, ours, the 95 % interval, the paper's figure."""
    unit = metric["unit"]
    interval = "" if metric["interval"] is None else " to ".join(format_value(v, unit) for v in metric["interval"])
    ours = metric.get("withheld") or format_value(metric["ours"], unit)  # reports before "withheld" lack it
    return {"metric": metric["label"], "ours": ours, "95 % interval": interval,
            "the paper": metric["paper"] or "-"}


REPORT_FIGURES = ("generation_funnel", "loss_curve")


def report_figure(report: dict[str, Any], key: str) -> tuple[str, Any] | None:
    """Return (caption, matplotlib figure) for one of ``REPORT_FIGURES``, or None when the run lacks its data."""
    import matplotlib.pyplot as plt

    if not report[key]:
        return None
    figure, axis = plt.subplots(figsize=(7, 3.2), constrained_layout=True)
    if key == "loss_curve":
        steps, losses = zip(*report["loss_curve"])
        axis.plot(steps, losses, marker="o", markersize=3)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("training loss (each step's batch)")
        axis.set_title("Fine-tune loss curve")
        return "The fine-tune's training loss per optimizer step (each point a different batch).", figure
    funnel = report["generation_funnel"]
    bars = axis.bar(list(funnel), [max(count, 0.8) for count in funnel.values()], color="#66c2a5")
    axis.bar_label(bars, labels=[f"{count:,}" for count in funnel.values()])
    axis.set_yscale("log")
    axis.set_ylim(0.7, None)
    axis.set_ylabel("task blocks (log scale)")
    axis.set_title("Generation funnel")
    return "Where the generated task blocks went: parsed, passed upstream's filters, kept.", figure


def report_figures(report: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """Return every figure the run has data for: {key: (caption, figure)}."""
    return {key: figure for key in REPORT_FIGURES if (figure := report_figure(report, key)) is not None}


def report_html(report: dict[str, Any]) -> str:
    """Return the report card as one self-contained HTML page (the figures inlined as PNG)."""
    import html

    import matplotlib.pyplot as plt

    body = [f"<pre>{html.escape(report_markdown(report))}</pre>"]
    for caption, figure in report_figures(report).values():
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
        plt.close(figure)
        encoded = base64.b64encode(buffer.getvalue()).decode()
        body.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{encoded}">'
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>alpaca-nb report card</title></head><body>"
            + "\n".join(body) + "</body></html>\n")


def write_report(report: dict[str, Any], out: str | os.PathLike) -> None:
    """Write ``report.json``, ``report.md`` and ``report.html`` into ``out``."""
    out = Path(out)
    write_text_atomically(out / "report.json", json.dumps(report, indent=1) + "\n")
    write_text_atomically(out / "report.md", report_markdown(report))
    write_text_atomically(out / "report.html", report_html(report))
