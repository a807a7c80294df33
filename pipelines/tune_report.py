"""What ``beamvision tune`` reports: trials.parquet's rows, each flag's influence, the plot, the table.

Plain functions over the finished trial records of ``transforms.trials``.
A flag's influence is the share of the metric's variance between trials that
its values explain (the correlation ratio, eta squared: trials grouped by the
flag's value, numeric flags with many values in four quantile bins). It says
which flags mattered in this search, not why; with few trials it is rough.
A trial stopped early counts with its best value before it stopped, beside
those that ran to the end: the flags that lose early weigh as losers.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from beamvision.transforms.trials import COMPLETED, FAILED, rank, scored_records

BINS = 4  # numeric flags with more distinct values than this are grouped in quantile bins
PLOTTED_FLAGS = 3


def _groups(values: list[Any]) -> list[Any]:
    """Each value's group: itself, or its quantile bin for a numeric flag with many values."""
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if not numeric or len(set(values)) <= BINS:
        return [json.dumps(v) for v in values]
    edges = np.quantile(np.asarray(values, dtype=float), np.linspace(0, 1, BINS + 1)[1:-1])
    return list(np.searchsorted(edges, np.asarray(values, dtype=float), side="right"))


def influence(records: list[dict[str, Any]], flags: list[str]) -> dict[str, float]:
    """Each flag's eta squared over the scored trials, most influential first (0 with no spread)."""
    scored = scored_records(records)
    y = np.asarray([r["best"] for r in scored], dtype=float)
    total = float(((y - y.mean()) ** 2).sum()) if len(y) else 0.0
    out = {}
    for flag in flags:
        groups = _groups([r["flags"].get(flag) for r in scored])
        between = 0.0
        for group in set(groups):
            members = y[[g == group for g in groups]]
            between += len(members) * (members.mean() - y.mean()) ** 2
        out[flag] = round(between / total, 4) if total > 0 else 0.0
    return dict(sorted(out.items(), key=lambda item: -item[1]))


def best_record(records: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The completed trial with the best ``metric`` (ties: the earlier trial)."""
    return next(iter(rank([r for r in records if r["status"] == COMPLETED], metric)), None)


def _column(values: list[Any]) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # a flag whose choices mix types
        return pa.array([None if v is None else json.dumps(v) for v in values], pa.string())


def trials_table(records: list[dict[str, Any]], flags: list[str], metric: str) -> pa.Table:
    """trials.parquet: one row per trial, in trial order."""
    records = sorted(records, key=lambda r: r["index"])
    metrics = [r.get("metrics") or {} for r in records]
    columns = {
        "trial": pa.array([r["index"] for r in records], pa.int32()),
        "trial_id": pa.array([r["trial_id"] for r in records], pa.string()),
        "status": pa.array([r["status"] for r in records], pa.string()),
        **{flag: _column([r["flags"].get(flag) for r in records]) for flag in flags},
        metric: pa.array([r.get("best") for r in records], pa.float64()),
        f"{metric}_per_epoch": pa.array(
            [r.get("history", {}).get(metric, []) for r in records], pa.list_(pa.float64())
        ),
        "epochs_run": pa.array([r.get("epochs_run", 0) for r in records], pa.int32()),
        "epochs_planned": pa.array([r["epochs_planned"] for r in records], pa.int32()),
        "rung": pa.array([r["rung"] for r in records], pa.int32()),
        "evaluated_on": pa.array([m.get("evaluated_on") for m in metrics], pa.string()),
        "accuracy": pa.array([m.get("accuracy") for m in metrics], pa.float64()),
        "top5_accuracy": pa.array([m.get("top5_accuracy") for m in metrics], pa.float64()),
        "macro_f1": pa.array([m.get("macro_f1") for m in metrics], pa.float64()),
        "seconds": pa.array([r["seconds"] for r in records], pa.float64()),
        "error": pa.array([r.get("error") for r in records], pa.string()),
        "artifact": pa.array([r.get("artifact") for r in records], pa.string()),
        "flags": pa.array([json.dumps(r["flags"], sort_keys=True) for r in records], pa.string()),
        "history": pa.array([json.dumps(r.get("history", {})) for r in records], pa.string()),
    }
    return pa.table(columns)


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "-" if value is None else str(value)


def table_text(records: list[dict[str, Any]], flags: list[str], metric: str, best_id: str | None) -> str:
    """The trials as the aligned text table that tune prints."""
    splits = {(r.get("metrics") or {}).get("evaluated_on") for r in records} - {None}
    scored_on = splits.pop() if len(splits) == 1 else "test"  # test, else val (train's rule)
    header = ["trial", "status", *flags, "epochs", metric, f"{scored_on} acc", "seconds"]
    rows = []
    for r in sorted(records, key=lambda r: r["index"]):
        accuracy = (r.get("metrics") or {}).get("accuracy")
        status = r["status"] + (" (best)" if r["trial_id"] == best_id else "")
        rows.append(
            [
                str(r["index"]),
                status,
                *(_shown(r["flags"].get(f)) for f in flags),
                f"{r.get('epochs_run', 0)}/{r['epochs_planned']}",
                "-" if r.get("best") is None else f"{r['best']:.4f}",
                "-" if accuracy is None else f"{accuracy:.1%}",
                f"{r['seconds']:.0f}",
            ]
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in [header, *rows]]
    for r in sorted(records, key=lambda r: r["index"]):
        if r["status"] == FAILED:
            lines.append(f"trial {r['index']} failed: {r['error']}")
    return "\n".join(lines)


def plot(
    records: list[dict[str, Any]],
    ranked_flags: list[str],
    metric: str,
    log_flags: set[str],
    influences: dict[str, float],
    best_id: str | None,
    path: str,
) -> None:
    """plot.png: each trial's metric per epoch, then the metric against the most influential flags."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = sorted(scored_records(records), key=lambda r: r["index"])
    spread = [f for f in ranked_flags if len({json.dumps(r["flags"].get(f)) for r in scored}) > 1]
    flags = spread[:PLOTTED_FLAGS]  # a flag with one value among the scored trials shows nothing

    def colour(record):
        if record["trial_id"] == best_id:
            return "tab:orange"
        return "tab:blue" if record["status"] == COMPLETED else "grey"

    fig, axes = plt.subplots(1, 1 + len(flags), figsize=(4.6 * (1 + len(flags)), 3.8), squeeze=False)
    _plot_curves(axes[0][0], scored, metric, best_id, colour)
    for axis, flag in zip(axes[0][1:], flags, strict=True):
        x = _flag_positions(axis, [r["flags"].get(flag) for r in scored], flag in log_flags)
        axis.scatter(x, [r["best"] for r in scored], c=[colour(r) for r in scored], s=36, zorder=3)
        axis.set(xlabel=flag, ylabel=metric, title=f"{flag}: explains {influences.get(flag, 0):.0%} alone")
        axis.grid(alpha=0.3)
    fig.suptitle(f"{len(records)} trials: orange the best, blue completed, grey stopped early (dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_curves(axis, scored: list[dict[str, Any]], metric: str, best_id: str | None, colour) -> None:
    """Each trial's metric per epoch: the best bold, stopped trials dashed."""
    for r in scored:
        values = r["history"].get(metric, [])
        axis.plot(
            range(1, len(values) + 1),
            values,
            marker="o",
            markersize=3,
            color=colour(r),
            linewidth=2.5 if r["trial_id"] == best_id else 1.2,
            linestyle="-" if r["status"] == COMPLETED else "--",
            alpha=0.85,
        )
    axis.set(xlabel="epoch", ylabel=metric, title="each trial's epochs")
    axis.xaxis.get_major_locator().set_params(integer=True)


def _flag_positions(axis, values: list[Any], log_scaled: bool) -> np.ndarray:
    """Where each trial's value of a flag goes on ``axis``: numbers on a (log) scale, others by name."""
    import matplotlib.ticker

    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        x = np.asarray(values, dtype=float)
        if log_scaled or (x.min() > 0 and x.max() / x.min() >= 10):
            axis.set_xscale("log")
            ticker = matplotlib.ticker
            axis.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 3.0)))
            axis.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            axis.xaxis.set_minor_formatter(ticker.NullFormatter())
        return x
    labels = [v if isinstance(v, str) else json.dumps(v) for v in values]
    names = list(dict.fromkeys(labels))
    x = np.asarray([names.index(v) for v in labels], dtype=float)
    for i, name in enumerate(labels):  # trials of one value side by side, not on top
        same = [j for j, other in enumerate(labels) if other == name]
        x[i] += 0.08 * (same.index(i) - (len(same) - 1) / 2)
    axis.set_xticks(range(len(names)), names, rotation=20)
    axis.set_xlim(-0.5, len(names) - 0.5)
    return x
