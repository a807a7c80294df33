"""``beamvision compact --catalog ROOT``: fold a catalog's completed runs into one partition per model.

Each incremental night reads every earlier completed run's summary and the
key columns of all its shards; after a year of nights that is hundreds of
partitions. ``compact`` folds them, losslessly, into ``ROOT/run=compacted-ID``
(``beamvision.transforms.compaction``): the next night and the latest-label
query read a few large shards instead. It holds the catalog's lock
(``beamvision.transforms.catalog_lock``): refused while a night runs, and a
night that starts meanwhile is refused. Safe to interrupt at any point; the
same command finishes what a cut one began.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import time

from beamvision import exits, storage
from beamvision.console import Counts, ProgressLine, counted
from beamvision.pipelines.flags import UsageError, parse, positive_int
from beamvision.transforms import catalog_lock, compaction
from beamvision.transforms.outputs import lock_uri, run_dir

COMMAND = "compact"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--catalog", required=True, help="the catalog's root: the --output of classify --incremental"
    )
    parser.add_argument(
        "--shard_rows",
        type=positive_int,
        default=compaction.DEFAULT_SHARD_ROWS,
        help="rows per compacted shard: a bucket of URIs that a night looks its files up in "
        f"(default {compaction.DEFAULT_SHARD_ROWS:,})",
    )


@dataclasses.dataclass(frozen=True)
class Config:
    catalog: str
    shard_rows: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        return cls(args.catalog.rstrip("/") or args.catalog, args.shard_rows)


def run(argv: list[str] | None = None) -> None:
    config = Config.from_args(parse(f"beamvision {COMMAND}", __doc__.splitlines()[0], add_arguments, argv))
    storage.check_reachable(config.catalog)
    runs = storage.match_sizes(storage.join(glob.escape(config.catalog), "run=*", "*"))
    if not runs and not storage.exists(lock_uri(config.catalog)):
        raise UsageError(
            f"--catalog {config.catalog}: holds no run (a catalog is the --output of classify --incremental)"
        )
    started = time.monotonic()
    with catalog_lock.take(config.catalog, COMMAND, "--catalog"):
        made = _compact(config)
    if made:
        seconds = time.monotonic() - started
        print(f"{COMMAND}: done in {seconds:.1f} s; nights read each compacted run as one")


def _compact(config: Config) -> list[compaction.Folded]:
    runs = compaction.completed(config.catalog)
    leftover = compaction.leftovers(runs)
    if leftover:  # a compaction cut after its commit: finish it
        compaction.delete_runs(config.catalog, leftover)
        print(f"{COMMAND}: deleted {counted(len(leftover), 'run')} that an interrupted compaction had folded")
        runs = [run for run in runs if run not in leftover]
    for folder in compaction.stale_partials(config.catalog):
        storage.delete_tree(folder)
    plans = compaction.plan(runs)
    if not plans:
        print(
            f"{COMMAND}: nothing to fold in {config.catalog}: {counted(len(runs), 'completed run')}, "
            "none sharing a model and row layout with another"
        )
        return []
    total = sum(len(p.runs) for p in plans)
    made: list[compaction.Folded] = []
    exits.on_interrupt(lambda: _kept(config.catalog, made))
    line = ProgressLine(COMMAND, unit="runs")
    done = 0

    def folded_one(_run: compaction.Run) -> None:
        nonlocal done
        done += 1
        line.update(Counts(inputs=total, results=done))

    for plan in plans:
        made.append(compaction.fold(config.catalog, plan, config.shard_rows, folded_one))
    line.close(Counts(inputs=total, results=done))
    for folded in made:
        print(
            f"{COMMAND}: {counted(folded.runs, 'run')} -> {run_dir(config.catalog, folded.run_id)}: "
            f"{counted(folded.results, 'result row')}, {counted(folded.errors, 'error row')}; "
            f"{folded.files_before:,} files -> {folded.files_after:,}"
        )
    return made


def _kept(catalog: str, made: list[compaction.Folded]) -> str:
    done = "".join(f"; {run_dir(catalog, folded.run_id)} is complete" for folded in made)
    return f"every row is kept, in its own run or a compacted one{done}; run the same command again to finish"
