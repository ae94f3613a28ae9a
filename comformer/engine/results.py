"""The results of a scenario, one row per finished step: ``results.json`` and ``results.csv``,
the steps x old/new/all table ``results.md`` and its plot ``results.png``, all written atomically.
"""

import csv
import io
import json
import math
import os
from typing import Dict, List

from ..utils.io import atomic_write_json, atomic_write_text

__all__ = [
    "TABLE_COLUMNS",
    "flatten_results",
    "load_results",
    "results_table",
    "summary_line",
    "eval_summary",
    "plot_results",
    "plot_methods",
    "record_step",
]

# Columns of the per-step table: (results key, header).
TABLE_COLUMNS = (
    ("PQ_old", "PQ old"),
    ("PQ_new", "PQ new"),
    ("PQ_all", "PQ all"),
    ("mIoU_old", "mIoU old"),
    ("mIoU_new", "mIoU new"),
    ("mIoU_all", "mIoU all"),
)


def flatten_results(results: Dict) -> Dict[str, float]:
    """{"panoptic_seg": {"PQ": ..}, "sem_seg": {"mIoU": ..}} -> PQ_all, PQ_old, mIoU_all, ..."""
    flat = {}
    pan = results.get("panoptic_seg", {})
    sem = results.get("sem_seg", {})
    for key, value in pan.items():
        flat["PQ_all" if key == "PQ" else key] = value
    for key, value in sem.items():
        flat["mIoU_all" if key == "mIoU" else key] = value
    return {k: float(v) for k, v in flat.items()}


def load_results(output_dir: str) -> List[Dict]:
    path = os.path.join(output_dir, "results.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return json.load(f)


def _fmt(value) -> str:
    return (
        "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"
    )


def results_table(rows: List[Dict], title: str = "") -> str:
    """Markdown table: one line per step, old / new / all PQ and mIoU (columns absent are left out)."""
    columns = [(k, h) for k, h in TABLE_COLUMNS if any(k in r for r in rows)]
    lines = [f"### {title}", ""] if title else []
    lines.append("| method | step | classes | " + " | ".join(h for _, h in columns) + " |")
    lines.append("|---|---:|---:|" + "---:|" * len(columns))
    for r in rows:
        values = " | ".join(_fmt(r.get(k)) for k, _ in columns)
        lines.append(f"| {r['method']} | {r['step']} | {r['num_seen']} | {values} |")
    return "\n".join(lines)


def summary_line(row: Dict) -> str:
    """One step's results in one line: "PQ all 1.9 (old 4.6, new 0.0), mIoU all 7.1 (...)"."""
    parts = []
    for metric in ("PQ", "mIoU"):
        if f"{metric}_all" not in row:
            continue
        split = [
            f"{p} {_fmt(row[f'{metric}_{p}'])}" for p in ("old", "new") if f"{metric}_{p}" in row
        ]
        parts.append(
            f"{metric} all {_fmt(row[f'{metric}_all'])}"
            + (f" ({', '.join(split)})" if split else "")
        )
    return ", ".join(parts) or "no metrics"


# Summary metrics of detectron2's evaluators, in the order shown (per-class keys are left out).
_SUMMARY_KEYS = ("PQ", "SQ", "RQ", "PQ_th", "PQ_st", "mIoU", "fwIoU", "mACC", "pACC")


def eval_summary(results: Dict) -> str:
    """detectron2 evaluation results ({task: {metric: value}}) as one line per task with the
    summary metrics, e.g. "panoptic_seg: PQ 2.0  SQ 61.3  RQ 2.9 ..."."""
    lines = []
    for task, metrics in results.items():
        if not isinstance(metrics, dict):
            continue
        shown = [f"{k} {_fmt(float(metrics[k]))}" for k in _SUMMARY_KEYS if k in metrics]
        lines.append(f"{task}: " + "  ".join(shown))
    return "\n".join(lines)


def _write_csv(path: str, rows: List[Dict]) -> None:
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys and not isinstance(r[k], (dict, list))]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def plot_results(path: str, rows: List[Dict], title: str) -> None:
    """PQ and mIoU (old / new / all) per step, one panel each (a metric no row has is left out:
    a semantic dataset has no PQ)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in ("PQ", "mIoU") if any(f"{m}_all" in r for r in rows)] or ["mIoU"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.5), squeeze=False)
    steps = [r["step"] for r in rows]
    for ax, metric in zip(axes[0], metrics):
        for part, style in (("all", "-o"), ("old", "--s"), ("new", ":^")):
            key = f"{metric}_{part}"
            values = [r.get(key, float("nan")) for r in rows]
            if all(v is None or math.isnan(v) for v in values):
                continue
            ax.plot(steps, values, style, label=part)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.set_xticks(steps)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def plot_methods(path: str, rows_by_method: Dict[str, List[Dict]], title: str) -> None:
    """
    Methods compared on one figure: a panel per metric (PQ, mIoU; rows) and class group (old,
    new, all; columns), one line per method over the steps. Panels without values are left out.

    Args:
        path: the PNG to write (atomically).
        rows_by_method: each method's rows of results.json, in the order to draw.
        title: the figure's title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def values(rows, key):
        return [r.get(key) if r.get(key) is not None else float("nan") for r in rows]

    metrics = [
        m
        for m in ("PQ", "mIoU")
        if any(f"{m}_all" in r for rows in rows_by_method.values() for r in rows)
    ]
    parts = ("old", "new", "all")
    fig, axes = plt.subplots(
        len(metrics), 3, figsize=(12, 3.4 * len(metrics)), squeeze=False, sharex=True
    )
    steps = sorted({r["step"] for rows in rows_by_method.values() for r in rows})
    markers = "os^Dvx*P"
    for i, metric in enumerate(metrics):
        for j, part in enumerate(parts):
            ax = axes[i][j]
            key = f"{metric}_{part}"
            for k, (method, rows) in enumerate(rows_by_method.items()):
                rows = sorted(rows, key=lambda r: r["step"])
                ys = values(rows, key)
                if all(math.isnan(y) for y in ys):
                    continue
                ax.plot([r["step"] for r in rows], ys, marker=markers[k % len(markers)],
                        label=method)  # fmt: skip
            ax.set_title(f"{metric} {part}")
            ax.set_ylim(bottom=0)  # a zoomed axis would make small differences look large
            ax.set_xticks(steps)
            ax.grid(alpha=0.3)
            if i == len(metrics) - 1:
                ax.set_xlabel("step")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=len(labels))
    fig.suptitle(title, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def record_step(output_dir: str, row: Dict, title: str) -> List[Dict]:
    """Add (or replace) the row of a step in results.json/csv and rewrite the table and plot."""
    rows = [r for r in load_results(output_dir) if r["step"] != row["step"]] + [row]
    rows.sort(key=lambda r: r["step"])
    atomic_write_json(os.path.join(output_dir, "results.json"), rows)
    _write_csv(os.path.join(output_dir, "results.csv"), rows)
    atomic_write_text(os.path.join(output_dir, "results.md"), results_table(rows, title) + "\n")
    plot_results(os.path.join(output_dir, "results.png"), rows, title)
    return rows
