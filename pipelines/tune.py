"""``beamvision tune``: a hyper-parameter search whose trials train side by side in Beam workers.

    beamvision tune --data gs://bucket/data/flowers --space space.yaml --output gs://bucket/tune/t1 \\
        --search random --trials 12 [--runner DataflowRunner | --direct_num_workers 2 \\
        --direct_running_mode multi_processing ...]

Each trial is one element of the pipeline and runs ``beamvision train``'s own
code (``train.train``) on the prepared TFRecords; successive halving ranks
trials at fractions of their epochs and only the best go on
(``transforms.trials``). Writes, under DIR: trials.parquet (a row per trial:
flags, metric per epoch, final metrics, seconds, status, error), trials.txt
(the table it prints), summary.json, plot.png (the metric against the most
influential flags) and best/, the best completed trial's artifact, which
classify runs as it is. The same seed gives the same trials in the same order;
a rerun into the same DIR skips every trial rung already done.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
import threading
import time
from typing import Any

import apache_beam as beam
from apache_beam.runners.runner import PipelineResult

from beamvision import storage
from beamvision.models import ModelError
from beamvision.models.training import checkpoint_root, dataset_fingerprint, read_dataset_info
from beamvision.pipelines import options, train
from beamvision.pipelines.search_space import SearchSpace, SpaceError, parse_space
from beamvision.pipelines.tune_report import best_record, influence, plot, table_text, trials_table
from beamvision.transforms.runners import runner_name, sees_local_disk
from beamvision.transforms.sizing import DEFAULT_SIZING, WorkerSizing
from beamvision.transforms.trials import (
    COMPLETED,
    FAILED,
    MODEL_DIR,
    STOPPED,
    TRIALS_DIR,
    TrainTrials,
    TrialError,
    rung_epochs,
    trial_id,
)

TRIALS_FILE, TABLE_FILE, SUMMARY_FILE, PLOT_FILE, BEST_DIR = (
    "trials.parquet",
    "trials.txt",
    "summary.json",
    "plot.png",
    "best",
)
SEARCH_FILE = "search.json"  # the search as run: flags, space, trials


def load_space(uri: str) -> SearchSpace:
    """The space file at ``uri``, every flag and value checked by train's parser (UsageError if not)."""
    defaults = options.train_defaults()

    def check(flag: str, value: Any) -> None:
        flags = {"data": "d", "architecture": "squeezenet", "output": "o", flag: value}
        try:
            options.parse("beamvision train", "", options.add_train_arguments, options.train_flag_argv(flags))
        except options.UsageError as exc:
            raise SpaceError(f"{flag}: {str(exc).removeprefix('beamvision train: error: ')}") from None

    try:
        text = storage.read_text(uri)
    except (OSError, UnicodeError) as exc:
        raise options.UsageError(f"--space {uri}: cannot be read as text ({exc})") from None
    try:
        return parse_space(text, set(defaults) - set(options.TUNE_RESERVED), check, options.TUNE_RESERVED)
    except SpaceError as exc:
        raise options.UsageError(f"--space {uri}: {exc}") from None


def plan_trials(config: options.TuneConfig, space: SearchSpace, fingerprint: str) -> list[dict[str, Any]]:
    """The trials in order: index, id, train flags (with the search's seed unless it varies), epochs.

    Each trial's flags are parsed as train parses its argv, so a flag that
    every trial lacks (``architecture``) fails here, before any work; only
    what train refuses in combination (``freeze_base`` without pretrained
    weights) is left for the trial's own error row.
    """
    try:
        drawn = space.trials(config.search, config.trials, config.seed)
    except SpaceError as exc:
        raise options.UsageError(f"--space {config.space}: {exc}") from None
    defaults = options.train_defaults()
    identity = {  # whatever else shapes a trial's results, so a changed search reuses no record
        "dataset": fingerprint,
        "metric": config.metric,
        "rungs": config.rungs,
        "reduction_factor": config.reduction_factor,
        "defaults": {k: v for k, v in defaults.items() if k not in options.TUNE_RESERVED},
    }
    trials = []
    for index, flags in enumerate(drawn):
        flags = {**flags, "seed": flags.get("seed", config.seed)}
        argv = options.train_flag_argv({"data": "d", "output": "o", **flags})
        try:
            options.parse("beamvision train", "", options.add_train_arguments, argv)
        except options.UsageError as exc:
            message = str(exc).removeprefix("beamvision train: error: ")
            raise options.UsageError(f"--space {config.space}: trial {index} ({flags}): {message}") from None
        trials.append(
            {
                "index": index,
                "trial_id": trial_id(index, flags, identity),
                "flags": flags,
                "epochs_planned": int(flags.get("epochs", defaults["epochs"])),
            }
        )
    return trials


_ONE_TRIAL_AT_A_TIME = threading.Lock()


def train_trial(data: str, metric: str, flags: dict, output: str, pause_after: int | None, extra: dict):
    """One trial: train's flag checks, then train's own training (TrialError for refused flags)."""
    import keras

    values = {**flags, "data": data, "output": output, "monitor": metric, "overwrite": True}
    # Keras's session, seeds and TensorFlow's pools are the process's: a process that runs bundles
    # on several threads (Dataflow's one SDK process per machine) trains one trial at a time.
    with _ONE_TRIAL_AT_A_TIME:
        keras.utils.clear_session()  # a worker trains trial after trial: each starts afresh
        try:
            outcome = train.train(
                options.train_config(values), pause_after, extra, f"trial {extra['trial']['index']}"
            )
        except (options.UsageError, ModelError) as exc:
            raise TrialError(str(exc).removeprefix("beamvision train: error: ")) from None
    return outcome.history, outcome.epochs_run, outcome.manifest


def size_trial_threads(sizing: WorkerSizing) -> None:
    """TensorFlow's pools of a worker process: its share of the machine's cores.

    Training computes as inference does, so it takes the inference threads'
    rule (cores / processes per machine).
    """
    from beamvision.transforms.engines import set_tensorflow_threads

    set_tensorflow_threads(sizing.threads("inference"))


def build_pipeline(pipeline: beam.Pipeline, config: options.TuneConfig, space, trials: list[dict]) -> None:
    sizing = DEFAULT_SIZING.for_pipeline(pipeline)
    finished = (
        pipeline
        | "Trials" >> beam.Create(trials)
        | "TrainTrials"
        >> TrainTrials(
            config.output,
            functools.partial(train_trial, config.data, config.metric),
            config.metric,
            rung_epochs(max(t["epochs_planned"] for t in trials), config.rungs, config.reduction_factor),
            config.reduction_factor,
            functools.partial(size_trial_threads, sizing),
        )
    )
    _ = (
        finished
        | "GatherTrials" >> beam.combiners.ToList()
        | "WriteReport" >> beam.Map(write_report, config, space.varied, sorted(space.log_scaled()))
    )


def write_report(records: list[dict], config: options.TuneConfig, varied: list[str], log_flags: list[str]):
    """trials.parquet, trials.txt, plot.png, best/ and summary.json (last: the search's commit point)."""
    import pyarrow.parquet as pq

    out = config.output
    flags = sorted({f for r in records for f in r["flags"]}, key=lambda f: (f not in varied, f))
    best = best_record(records, config.metric)
    best_id = best["trial_id"] if best else None
    influences = influence(records, varied)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, TRIALS_FILE)
        pq.write_table(trials_table(records, flags, config.metric), local)
        storage.write_atomic(storage.join(out, TRIALS_FILE), local_path=local)
        local = os.path.join(tmp, PLOT_FILE)
        plot(records, list(influences), config.metric, set(log_flags), influences, best_id, local)
        storage.write_atomic(storage.join(out, PLOT_FILE), local_path=local)
    shown = [f for f in flags if f in varied] or flags[:1]
    storage.write_atomic(
        storage.join(out, TABLE_FILE), (table_text(records, shown, config.metric, best_id) + "\n").encode()
    )
    for record in records:  # a stopped trial never goes on: its checkpoint goes
        if record["status"] == STOPPED:
            storage.delete_tree(checkpoint_root(storage.join(out, TRIALS_DIR, record["trial_id"], MODEL_DIR)))
    best_uri = storage.join(out, BEST_DIR)
    storage.delete_tree(best_uri)
    if best:
        storage.copy_tree(best["artifact"], best_uri)
    counts = {s: sum(r["status"] == s for r in records) for s in (COMPLETED, STOPPED, FAILED)}
    summary = {
        "trials": len(records),
        **counts,
        "search": config.search,
        "metric": config.metric,
        "seed": config.seed,
        "successive_halving": {"rungs": config.rungs, "reduction_factor": config.reduction_factor},
        "seconds_in_trials": round(sum(r["seconds"] for r in records), 1),
        "influence": influences,
        "best": None
        if best is None
        else {
            "trial": best["index"],
            "trial_id": best_id,
            "flags": best["flags"],
            config.metric: best["best"],
            "metrics": best["metrics"],
            "artifact": best_uri,
        },
        "outputs": {
            name: storage.join(out, name) for name in (TRIALS_FILE, TABLE_FILE, PLOT_FILE, SEARCH_FILE)
        },
    }
    storage.write_atomic(storage.join(out, SUMMARY_FILE), json.dumps(summary, indent=2).encode())


def run(argv: list[str] | None = None) -> PipelineResult | None:
    """Checks the data and the space before any work, runs the search, prints its table and summary."""
    args, pipeline_options = options.parse_pipeline_args(
        "beamvision tune", __doc__.splitlines()[0], options.add_tune_arguments, argv
    )
    config = options.TuneConfig.from_args(args)
    started = time.monotonic()
    labels, stats = read_dataset_info(config.data)
    if not stats["totals"].get("val"):
        raise options.UsageError(
            f"--data {config.data}: has no validation split, which ranks the trials "
            "(prepare with --val_fraction above 0)"
        )
    space = load_space(config.space)
    trials = plan_trials(config, space, dataset_fingerprint(config.data, labels, stats))
    if not trials:
        raise options.UsageError(f"--space {config.space}: gives no trial")
    pipeline = beam.Pipeline(options=pipeline_options)
    build_pipeline(pipeline, config, space, trials)
    if options.is_dry_run(pipeline_options):
        return options.build_only(pipeline)
    _check_shared_storage(config, pipeline)
    if config.overwrite:
        for name in (TRIALS_DIR, BEST_DIR):
            storage.delete_tree(storage.join(config.output, name))
    done = _rungs_done(config.output, trials)
    print(
        f"tune: {len(trials)} trials ({config.search} search over {', '.join(space.varied) or 'nothing'}), "
        f"ranked on {config.metric}; {done} trial rungs already done in {config.output}",
        flush=True,
    )
    search = {
        "config": vars(args) | {"overwrite": config.overwrite},
        "space": space.describe(),
        "trials": trials,
    }
    storage.write_atomic(storage.join(config.output, SEARCH_FILE), json.dumps(search, indent=2).encode())
    summary_uri = storage.join(config.output, SUMMARY_FILE)
    if storage.exists(summary_uri):  # the report's commit point: what is printed is this run's
        storage.delete(summary_uri)
    result = pipeline.run()
    result.wait_until_finish()
    summary = json.loads(storage.read_text(storage.join(config.output, SUMMARY_FILE)))
    print(storage.read_text(storage.join(config.output, TABLE_FILE)), end="")
    print(_format_summary(summary, config, time.monotonic() - started))
    return result


def _check_shared_storage(config: options.TuneConfig, pipeline: beam.Pipeline) -> None:
    """Workers of a remote runner cannot see this machine's disk: data and output must be in storage."""
    from apache_beam.io.filesystems import FileSystems

    if sees_local_disk(pipeline):
        return
    runner = runner_name(pipeline)
    for flag, uri in (("--data", config.data), ("--output", config.output)):
        if FileSystems.get_scheme(uri) is None:
            raise options.UsageError(
                f"{flag} {uri}: a local path, which {runner}'s workers cannot reach (use gs://)"
            )


def _rungs_done(output: str, trials: list[dict]) -> int:
    """Rung records of these trials already in ``output`` (their rungs are not trained again)."""
    ids = {t["trial_id"] for t in trials}
    return sum(
        1
        for uri in storage.list_files(storage.join(output, TRIALS_DIR))
        if re.fullmatch(r"rung-\d+\.json", os.path.basename(uri))
        and os.path.basename(os.path.dirname(uri)) in ids
    )


def _format_summary(summary: dict, config: options.TuneConfig, seconds: float) -> str:
    lines = [
        f"tune: {summary['trials']} trials in {seconds:.0f}s "
        f"({summary['seconds_in_trials']:.0f}s of training in the workers): "
        f"{summary['completed']} completed, {summary['stopped']} stopped early, {summary['failed']} failed"
    ]
    best = summary["best"]
    if best:
        accuracy = best["metrics"].get("accuracy")
        tested = (
            f", {best['metrics'].get('evaluated_on')} accuracy {accuracy:.1%}" if accuracy is not None else ""
        )
        lines.append(
            f"best: trial {best['trial']} ({json.dumps(best['flags'], sort_keys=True)}), "
            f"{config.metric} {best[config.metric]:.4f}{tested}"
        )
        lines.append(
            f"best artifact: {best['artifact']} (beamvision classify --model {best['artifact']} ...)"
        )
    else:
        lines.append("no trial completed: see the errors above")
    influential = [f"{flag} {share:.0%}" for flag, share in summary["influence"].items()]
    if influential:
        shares = ", ".join(influential)
        lines.append(f"influence on {config.metric} (the share each flag explains alone): {shares}")
    lines.append(
        f"trials: {summary['outputs']['trials.parquet']}; plot: {summary['outputs']['plot.png']}; "
        f"summary: {storage.join(config.output, SUMMARY_FILE)}"
    )
    return "\n".join(lines)
