"""``beamvision tune``: a hyper-parameter search whose trials train side by side in Beam workers.

    beamvision tune --data gs://bucket/data/flowers --space space.yaml --output gs://bucket/tune/t1 \\
        --search random --trials 12 [--runner DataflowRunner | --direct_num_workers 2 \\
        --direct_running_mode multi_processing ...]

Each trial is one element of the pipeline and runs ``beamvision train``'s own
training step (``beamvision.models.trainer.train``) on the prepared TFRecords,
with a ``TrainConfig`` built from the trial's values; successive halving ranks
trials at fractions of their epochs and only the best go on
(``transforms.trials``). Writes, under DIR: trials.parquet (a row per trial:
flags, metric per epoch, final metrics, seconds, status, error), trials.txt
(the table it prints), summary.json, plot.png (the metric against the most
influential flags) and best/, the best completed trial's artifact, which
classify runs as it is. The same seed gives the same trials in the same order;
a rerun into the same DIR skips every trial rung already done.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import shlex
import tempfile
import threading
import time
from typing import Any

import apache_beam as beam
from apache_beam.runners.runner import PipelineResult

from beamvision import exits, storage, values
from beamvision.console import counted
from beamvision.models import ModelArgumentError, ModelError
from beamvision.models.checkpoints import checkpoint_root
from beamvision.models.train_config import (
    DEFAULT_RANKING,
    MONITORS,
    VALUE_CHECKS,
    TrainConfig,
    defaults,
    resolve_monitor,
)
from beamvision.models.trainer import train
from beamvision.models.training import dataset_fingerprint, read_dataset_info
from beamvision.pipelines.flags import (
    UsageError,
    add_switch,
    check_engines,
    check_file_exists,
    model_argument_error,
    parse_pipeline_args,
    positive_int,
    value_type,
)
from beamvision.pipelines.launch import build_only, is_dry_run, run_to_end
from beamvision.pipelines.search_space import SearchSpace, SpaceError, parse_space
from beamvision.pipelines.tune_report import best_record, influence, plot, table_text, trials_table
from beamvision.transforms.engines import engine_files
from beamvision.transforms.runners import new_pipeline, runner_name, sees_local_disk
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
SEARCHES = ("grid", "random")
DEFAULT_RANDOM_TRIALS = 10
# Train flags a search space may not set, and why: tune sets them for every trial.
TUNE_RESERVED = {
    "data": "set by tune's --data",
    "output": "tune writes each trial's artifact under --output",
    "monitor": "set by tune's --metric",
    "name": "the best trial's artifact is named by its architecture",
    "version": "each trial's artifact is versioned by its training time",
    "overwrite": "tune's --overwrite starts a search afresh",
    "quiet": "a flag of tune's own run, not of its trials",
    "verbose": "a flag of tune's own run, not of its trials",
}
# The rule of each value a trial may set: train's (and --engines', a flag of the artifact it writes).
TRIAL_CHECKS = {
    key: check
    for key, check in {**VALUE_CHECKS, "engines": check_engines}.items()
    if key not in TUNE_RESERVED
}
# What a trial must set that has no default (tune sets data and output).
TRIAL_REQUIRED = [
    f.name
    for f in dataclasses.fields(TrainConfig)
    if f.default is dataclasses.MISSING and f.name not in TUNE_RESERVED
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="PREFIX", help="output of beamvision prepare")
    parser.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="where trials.parquet, summary.json, plot.png, best/ and each trial's files go",
    )
    parser.add_argument(
        "--space",
        required=True,
        metavar="FILE",
        help="YAML or JSON file of train flags: a value, a list of values, or {low, high, log, num}",
    )
    parser.add_argument(
        "--search", choices=SEARCHES, default="random", help="grid: every combination; random (default)"
    )
    parser.add_argument(
        "--trials",
        type=positive_int,
        metavar="N",
        help=f"trials to run (default: {DEFAULT_RANDOM_TRIALS} random ones, or the whole grid)",
    )
    parser.add_argument(
        "--metric",
        choices=MONITORS,
        help="validation metric that ranks trials and stops them early (default "
        f"{DEFAULT_RANKING[False]}; on multi-label data {DEFAULT_RANKING[True]})",
    )
    parser.add_argument(
        "--rungs",
        type=positive_int,
        default=2,
        metavar="R",
        help="successive halving: trials are ranked after E/F^(R-1), ..., E/F epochs (E: the longest "
        "trial's) and only the best 1/F go on (default 2: at half; 1 runs every trial to the end)",
    )
    parser.add_argument(
        "--reduction_factor",
        type=value_type(
            values.checked(int, lambda v: v >= 2, "an integer of at least 2"), "reduction_factor"
        ),
        default=2,
        metavar="F",
        help="the F of --rungs (default 2: the best half goes on)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="S", help="draws the random trials; each trial's train seed"
    )
    add_switch(parser, "--overwrite", "start afresh: delete the trials already in --output")


@dataclasses.dataclass(frozen=True)
class Config:
    data: str
    output: str
    space: str
    search: str
    trials: int | None
    metric: str | None  # None until run reads the data: its default (DEFAULT_RANKING)
    rungs: int
    reduction_factor: int
    seed: int
    overwrite: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        check_file_exists("--space", args.space)
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
        if args.search == "random" and args.trials is None:
            given["trials"] = DEFAULT_RANDOM_TRIALS
        return cls(**{**given, "data": args.data.rstrip("/"), "output": args.output.rstrip("/")})


def load_space(uri: str) -> SearchSpace:
    """The space file at ``uri``, every flag and value checked by train's rules (UsageError if not)."""

    def check(flag: str, value: Any) -> None:
        try:
            TRIAL_CHECKS[flag](value)
        except ValueError as exc:
            raise SpaceError(f"{flag}: argument --{flag}: {exc}") from None

    try:
        text = storage.read_text(uri)
    except (OSError, UnicodeError) as exc:
        raise UsageError(f"--space {uri}: cannot be read as text ({exc})") from None
    try:
        return parse_space(text, set(TRIAL_CHECKS), check, TUNE_RESERVED)
    except SpaceError as exc:
        raise UsageError(f"--space {uri}: {exc}") from None


def plan_trials(config: Config, space: SearchSpace, fingerprint: str) -> list[dict[str, Any]]:
    """The trials in order: index, id, train flags (with the search's seed unless it varies), epochs.

    A value that every trial lacks (``architecture``) fails here, before any
    work; only what train refuses in combination (``freeze_base`` without
    pretrained weights) is left for the trial's own error row.
    """
    try:
        drawn = space.trials(config.search, config.trials, config.seed)
    except SpaceError as exc:
        raise UsageError(f"--space {config.space}: {exc}") from None
    default = defaults()
    identity = {  # whatever else shapes a trial's results, so a changed search reuses no record
        "dataset": fingerprint,
        "metric": config.metric,
        "rungs": config.rungs,
        "reduction_factor": config.reduction_factor,
        "defaults": {
            k: v for k, v in {**dict.fromkeys(TRIAL_REQUIRED), **default}.items() if k not in TUNE_RESERVED
        },
    }
    trials = []
    for index, flags in enumerate(drawn):
        flags = {**flags, "seed": flags.get("seed", config.seed)}
        missing = [f"--{key}" for key in TRIAL_REQUIRED if key not in flags]
        if missing:
            raise UsageError(
                f"--space {config.space}: trial {index} ({flags}): "
                f"the following arguments are required: {', '.join(missing)}"
            )
        trials.append(
            {
                "index": index,
                "trial_id": trial_id(index, flags, identity),
                "flags": flags,
                "epochs_planned": int(flags.get("epochs", default["epochs"])),
            }
        )
    return trials


def trial_config(data: str, metric: str, flags: dict, output: str) -> TrainConfig:
    """A trial's TrainConfig: its values (as train's rules take them) and what tune sets for every trial."""
    checked = {key: TRIAL_CHECKS[key](value) for key, value in flags.items()}
    return TrainConfig(**checked, data=data, output=output, monitor=metric, overwrite=True)


_ONE_TRIAL_AT_A_TIME = threading.Lock()


def train_trial(data: str, metric: str, flags: dict, output: str, pause_after: int | None, extra: dict):
    """One trial: train's checks, then train's own training step (TrialError for refused values)."""
    import keras

    # Keras's session, seeds and TensorFlow's pools are the process's: a process that runs bundles
    # on several threads (Dataflow's one SDK process per machine) trains one trial at a time.
    with _ONE_TRIAL_AT_A_TIME:
        keras.utils.clear_session()  # a worker trains trial after trial: each starts afresh
        try:
            config = trial_config(data, metric, flags, output)
            config.check()
        except ModelArgumentError as exc:
            raise TrialError(str(model_argument_error(exc))) from None
        except ValueError as exc:  # a ModelError, or a value refused (the space was checked: unlikely)
            raise TrialError(str(exc)) from None
        try:
            outcome = train(
                config, pause_after, extra, f"trial {extra['trial']['index']}", engine_files=engine_files
            )
        except ModelError as exc:
            raise TrialError(str(exc)) from None
    return outcome.history, outcome.epochs_run, outcome.manifest


def size_trial_threads(sizing: WorkerSizing) -> None:
    """TensorFlow's pools of a worker process: its share of the machine's cores.

    Training computes as inference does, so it takes the inference threads'
    rule (cores / processes per machine).
    """
    from beamvision.transforms.engines import set_tensorflow_threads

    set_tensorflow_threads(sizing.threads("inference"))


def build_pipeline(pipeline: beam.Pipeline, config: Config, space, trials: list[dict]) -> None:
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


def write_report(records: list[dict], config: Config, varied: list[str], log_flags: list[str]):
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
    args, pipeline_options = parse_pipeline_args(
        "beamvision tune", __doc__.splitlines()[0], add_arguments, argv
    )
    config = Config.from_args(args)
    started = time.monotonic()
    labels, stats = read_dataset_info(config.data)
    # The metric that ranks the trials: the one each trial monitors, the data's default if none.
    multi_label = bool(stats.get("multi_label"))
    config = dataclasses.replace(
        config, metric=resolve_monitor(config.metric, multi_label, "--metric", DEFAULT_RANKING)
    )
    if not stats["totals"].get("val"):
        raise UsageError(
            f"--data {config.data}: has no validation split, which ranks the trials "
            "(prepare with --val_fraction above 0)"
        )
    space = load_space(config.space)
    trials = plan_trials(config, space, dataset_fingerprint(config.data, labels, stats))
    if not trials:
        raise UsageError(f"--space {config.space}: gives no trial")
    pipeline = new_pipeline(pipeline_options)
    build_pipeline(pipeline, config, space, trials)
    if is_dry_run(pipeline_options):
        return build_only(pipeline)
    _check_shared_storage(config, pipeline)
    if config.overwrite:
        for name in (TRIALS_DIR, BEST_DIR):
            storage.delete_tree(storage.join(config.output, name))
    done = _rungs_done(config.output, trials)
    print(
        f"tune: {counted(len(trials), 'trial')} "
        f"({config.search} search over {', '.join(space.varied) or 'nothing'}), "
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
    exits.on_interrupt(
        lambda: (
            f"kept {_rungs_done(config.output, trials)} finished trial rungs in {config.output}; "
            "run the same command again to go on from them"
        )
    )
    result = run_to_end(pipeline)
    summary = json.loads(storage.read_text(storage.join(config.output, SUMMARY_FILE)))
    print(storage.read_text(storage.join(config.output, TABLE_FILE)), end="")
    print(_format_summary(summary, config, time.monotonic() - started))
    return result


def _check_shared_storage(config: Config, pipeline: beam.Pipeline) -> None:
    """Workers of a remote runner cannot see this machine's disk: data and output must be in storage."""
    from apache_beam.io.filesystems import FileSystems

    if sees_local_disk(pipeline):
        return
    runner = runner_name(pipeline)
    for flag, uri in (("--data", config.data), ("--output", config.output)):
        if FileSystems.get_scheme(uri) is None:
            raise UsageError(f"{flag} {uri}: a local path, which {runner}'s workers cannot reach (use gs://)")


def _rungs_done(output: str, trials: list[dict]) -> int:
    """Rung records of these trials already in ``output`` (their rungs are not trained again)."""
    ids = {t["trial_id"] for t in trials}
    return sum(
        1
        for uri in storage.list_files(storage.join(output, TRIALS_DIR))
        if re.fullmatch(r"rung-\d+\.json", os.path.basename(uri))
        and os.path.basename(os.path.dirname(uri)) in ids
    )


def _format_summary(summary: dict, config: Config, seconds: float) -> str:
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
        artifact = best["artifact"]
        lines.append(f"best artifact: {artifact} (beamvision classify --model {shlex.quote(artifact)} ...)")
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
