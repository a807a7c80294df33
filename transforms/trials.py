"""Trials of ``beamvision tune`` as elements of a Beam pipeline, stopped early by successive halving.

``TrainTrials`` takes trials (their index, id and train flags) and returns one
finished record per trial. Each trial trains in whichever worker gets it, so
trials run side by side on DirectRunner's ``multi_processing`` workers and on
Dataflow's alike. The rungs are stages of the pipeline:

    trials -> Reshuffle -> train to rung 0's epochs -> rank all -> best 1/F go on
           -> Reshuffle -> train on to rung 1's epochs (from the checkpoint) -> ... -> last rung

Why synchronous successive halving, not median stopping: a rung ranks every
trial at the same budget, so which trials stop depends only on their metrics,
never on which worker was fast. The same seed gives the same decisions, and no
state is shared between workers while they train (Dataflow's workers have none
to share). A trial that pauses at a rung keeps its checkpoint beside its
artifact, in the output's storage, so the next rung resumes it on any worker.

Each rung's record is written to ``DIR/trials/<id>/rung-<i>.json`` as it ends;
a rerun into the same DIR reads it instead of training again, so an
interrupted search resumes and a finished one costs nothing to repeat. Failed
records are not reused: a rerun tries them again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from beamvision import storage
from beamvision.transforms.rows import METRICS_NAMESPACE, exception_text

TRIALS_DIR = "trials"
DETAILED_METRICS = (
    "per_class",
    "confusion_matrix",
    "labels",
    "thresholds",
)  # left in each artifact's metrics.json
MODEL_DIR = "model"
# A trial's statuses: paused between rungs; then completed, stopped (not among the best at a rung)
# or failed (train refused its flags, or training raised: the error is recorded).
PAUSED, COMPLETED, STOPPED, FAILED = "paused", "completed", "stopped", "failed"

_log = logging.getLogger("beamvision")


class TrialError(Exception):
    """Train refuses a trial's flags (an impossible combination); the message is one line."""


def trial_id(index: int, flags: dict[str, Any], identity: dict[str, Any]) -> str:
    """``trial-007-<hash>``: the hash covers the flags and whatever else shapes its results."""
    payload = json.dumps({"flags": flags, **identity}, sort_keys=True)
    return f"trial-{index:03d}-{hashlib.sha256(payload.encode()).hexdigest()[:8]}"


def rung_epochs(epochs: int, rungs: int, factor: int) -> list[int]:
    """The epochs at which trials are ranked: epochs/F^(R-1), ..., epochs/F, epochs.

    ``epochs``: the search's longest trial's, so every trial is ranked after
    the same number of epochs; a shorter trial finishes at the first rung
    that reaches its own. Rounded up, at least 1, without repeats (fewer
    rungs when the epochs are few).
    """
    budgets = [max(1, math.ceil(epochs / factor ** (rungs - 1 - i))) for i in range(rungs)]
    return sorted(set(budgets))


def maximises(metric: str) -> bool:
    return not metric.endswith("loss")


def best_value(history: dict[str, list[float]], metric: str) -> float | None:
    """The best value of ``metric`` over the epochs in ``history`` (None when it has none)."""
    values = [v for v in history.get(metric, []) if v is not None and math.isfinite(v)]
    if not values:
        return None
    return max(values) if maximises(metric) else min(values)


def scored_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records that have a value of the metric (not failed, and validated at least once)."""
    return [r for r in records if r["status"] != FAILED and r.get("best") is not None]


def rank(records: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Records with a value of ``metric``, best first; ties go to the earlier trial."""
    sign = -1 if maximises(metric) else 1
    return sorted(scored_records(records), key=lambda r: (sign * r["best"], r["index"]))


def halve(records: list[dict[str, Any]], metric: str, factor: int) -> tuple[list[dict], list[dict]]:
    """One rung's decision: (records that go on, records that are done), each in trial order.

    The best ceil(n/F) of the n ranked trials (paused or completed) make the
    cut; a paused one among them goes on, a paused one outside it stops.
    Completed and failed trials are done either way.
    """
    ranked = rank(records, metric)
    cut = {r["trial_id"] for r in ranked[: math.ceil(len(ranked) / factor)]}
    going, done = [], []
    for record in sorted(records, key=lambda r: r["index"]):
        if record["status"] != PAUSED:
            done.append(record)
        elif record["trial_id"] in cut:
            going.append(record)
        else:
            done.append({**record, "status": STOPPED})
    return going, done


class TrainTrials(beam.PTransform):
    """Trials -> one finished record each (completed, stopped or failed), by successive halving.

    Each trial is ``{"index", "trial_id", "flags", "epochs_planned"}``.

    Args:
        output: the search's directory (``DIR``); trials write under DIR/trials.
        train: ``train(flags, output, pause_after, extra) -> (history, epochs_run, manifest or
            None)``, the command's training step; it raises ``TrialError`` for flags that train
            refuses, anything else for a trial that broke.
        metric: what ranks the trials (``val_accuracy``, ``val_loss``).
        budgets: the epochs of each rung (``rung_epochs``); factor: the F of halving.
        setup: called once per worker process before its first trial (thread pools).
    """

    def __init__(
        self,
        output: str,
        train: Callable,
        metric: str,
        budgets: list[int],
        factor: int,
        setup: Callable[[], None] | None = None,
    ):
        super().__init__()
        self._output, self._metric, self._rungs, self._factor = output, metric, len(budgets), factor
        self._step = _TrainRungFn(output, train, metric, budgets, setup)

    def expand(self, trials):
        finished = []
        going = trials
        for rung in range(self._rungs):
            records = (
                going
                | f"Spread rung {rung}" >> beam.Reshuffle()
                | f"Train rung {rung}" >> beam.ParDo(self._step, rung)
            )
            if rung == self._rungs - 1:
                finished.append(records)
                break
            decided = (
                records
                | f"Gather rung {rung}" >> beam.combiners.ToList()
                | f"Halve at rung {rung}"
                >> beam.FlatMap(_decide, self._metric, self._factor).with_outputs("done", main="going")
            )
            finished.append(decided.done)
            going = decided.going
        return finished | "All trials" >> beam.Flatten()


def _decide(records: list[dict], metric: str, factor: int):
    going, done = halve(records, metric, factor)
    if records:
        _log.info("rung: %d of %d trials go on", len(going), len(records))
    yield from going
    for record in done:
        yield beam.pvalue.TaggedOutput("done", record)


class _TrainRungFn(beam.DoFn):
    """Trains one trial on to its epochs at ``rung`` (or reads that rung's record from an earlier run)."""

    def __init__(self, output, train, metric, budgets, setup):
        self._output, self._train, self._metric = output, train, metric
        self._budgets, self._setup = budgets, setup
        self._trained = Metrics.counter(METRICS_NAMESPACE, "trial_rungs_trained")
        self._reused = Metrics.counter(METRICS_NAMESPACE, "trial_rungs_reused")
        self._failed = Metrics.counter(METRICS_NAMESPACE, "trial_rungs_failed")

    def setup(self):
        if self._setup is not None:
            self._setup()

    def process(self, trial: dict[str, Any], rung: int):
        folder = storage.join(self._output, TRIALS_DIR, trial["trial_id"])
        record_uri = storage.join(folder, f"rung-{rung}.json")
        if storage.exists(record_uri):
            record = json.loads(storage.read_text(record_uri))
            if record["status"] != FAILED:
                self._reused.inc()
                yield record
                return
        record = self._run(trial, rung, folder)
        storage.write_atomic(record_uri, json.dumps(record, indent=2).encode())
        self._trained.inc()
        yield record

    def _run(self, trial: dict[str, Any], rung: int, folder: str) -> dict[str, Any]:
        epochs = trial["epochs_planned"]  # a trial, or its record from the rung before
        last = rung == len(self._budgets) - 1 or self._budgets[rung] >= epochs
        pause_after = None if last else self._budgets[rung]
        record = {
            **{k: trial[k] for k in ("index", "trial_id", "flags")},
            "rung": rung,
            "epochs_planned": epochs,
            "seconds": float(trial.get("seconds", 0.0)),
            "error": None,
            "artifact": None,
            "metrics": {},
        }
        extra = {"trial": {k: trial[k] for k in ("index", "trial_id", "flags")} | {"search": self._output}}
        started = time.monotonic()
        try:
            history, epochs_run, manifest = self._train(
                trial["flags"], storage.join(folder, MODEL_DIR), pause_after, extra
            )
        except Exception as exc:  # a trial's failure is its row; the search goes on
            self._failed.inc()
            refused = isinstance(exc, TrialError)
            _log.warning("%s failed: %s", trial["trial_id"], exc, exc_info=not refused)
            return {
                **record,
                "status": FAILED,
                "error": str(exc) if refused else exception_text(exc),
                "history": {},
                "epochs_run": 0,
                "best": None,
                "seconds": record["seconds"] + time.monotonic() - started,
            }
        record.update(
            status=PAUSED if manifest is None else COMPLETED,
            history=history,
            epochs_run=epochs_run,
            best=best_value(history, self._metric),
            seconds=round(record["seconds"] + time.monotonic() - started, 2),
        )
        if manifest is not None:  # per class and confusion: in the artifact's metrics.json
            metrics = {k: v for k, v in manifest.metrics.items() if k not in DETAILED_METRICS}
            record.update(artifact=storage.join(folder, MODEL_DIR), metrics=metrics)
        return record
