"""What a classify run writes under its ``--output``: the one home of those names.

    OUTPUT/results-SSSSS-of-NNNNN.parquet   one row per classified image
    OUTPUT/errors-SSSSS-of-NNNNN.parquet    one row per input that could not be classified
    OUTPUT/summary.json                     written last: the run's commit point

While the run works, its rows go to parts in a folder of its own, committed
(renamed to the shards above, then summary.json) only when every input has
its row: a dead run's rows never show under OUTPUT, and the rerun of the
same command keeps them (``beamvision.transforms.resume``)::

    OUTPUT/_partial/attempt.json                what the rows were made with
    OUTPUT/_partial/results-part-<ID>.parquet   flushed every --checkpoint_every seconds
    OUTPUT/_partial/errors-part-<ID>.parquet

With ``--incremental``, OUTPUT is a root holding one Hive partition per run,
``OUTPUT/run=<ID>/``, each laid out as above; a run's parts are in
``OUTPUT/_partial/run=<ID>/``, which no ``run=*`` glob matches. A catalog's
writer holds ``OUTPUT/_catalog.lock`` (``beamvision.transforms.catalog_lock``);
``beamvision compact`` folds completed runs into ``OUTPUT/run=compacted-<ID>/``
(``beamvision.transforms.compaction``). ``prepare`` writes its error
rows under the same prefix. Writers, readers (evaluate, review,
export-labels, the next incremental run) and printed commands all take the
names from here.
"""

from __future__ import annotations

import glob
import re

from beamvision import storage

RESULTS_PREFIX = "results"
ERRORS_PREFIX = "errors"
SUMMARY_FILE = "summary.json"
RUN_PARTITION = "run"
PARTIAL_DIR = "_partial"  # a leading _ : Hive, Spark, Arrow and DuckDB pass it over
LOCK_FILE = "_catalog.lock"  # at a catalog's root, held by the one process writing it
COMPACTED_PREFIX = "compacted-"  # run=compacted-<newest run folded>: completed runs folded into one
SOURCE_RUN_COLUMN = "source_run"  # a compacted row's own run ID (its partition's run is the compaction's)
ATTEMPT_FILE = "attempt.json"
PART_INFIX = "part"
# What Beam's file sinks leave beside their output when a job dies before it finalises.
BEAM_TEMP_DIRS = "beam-temp-*"
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
# The files a classify run owns under its output (globs): a rerun replaces exactly these.
RUN_FILES = [f"{RESULTS_PREFIX}-*", f"{ERRORS_PREFIX}-*", SUMMARY_FILE]


def results_pattern(folder: str) -> str:
    """The glob of a run folder's result shards (``folder`` may itself be a glob of several runs)."""
    return storage.join(folder, f"{RESULTS_PREFIX}-*.parquet")


def errors_pattern(folder: str) -> str:
    """The glob of a run folder's error shards (``folder`` may itself be a glob of several runs)."""
    return storage.join(folder, f"{ERRORS_PREFIX}-*.parquet")


def run_dir(root: str, run_id: str) -> str:
    """An incremental run's partition under its root."""
    return storage.join(root, f"{RUN_PARTITION}={run_id}")


def lock_uri(root: str) -> str:
    """The lock file of a catalog root."""
    return storage.join(root, LOCK_FILE)


def summaries_pattern(root: str) -> str:
    """The glob of every incremental run's summary.json under a root."""
    return storage.join(glob.escape(root), f"{RUN_PARTITION}=*", SUMMARY_FILE)


def partial_dir(output: str, run_id: str | None = None) -> str:
    """Where a run's parts wait for its commit: OUTPUT/_partial, or ROOT/_partial/run=ID (incremental)."""
    if run_id is None:
        return storage.join(output, PARTIAL_DIR)
    return storage.join(output, PARTIAL_DIR, f"{RUN_PARTITION}={run_id}")


def part_name(prefix: str, part_id: str) -> str:
    """A part's file name: ``results-part-<ID>.parquet``."""
    return f"{prefix}-{PART_INFIX}-{part_id}.parquet"


def parts_pattern(partial: str, prefix: str) -> str:
    """The glob of a partial folder's parts of one kind (``results`` or ``errors``)."""
    return storage.join(glob.escape(partial), f"{prefix}-{PART_INFIX}-*.parquet")


def shard_name(prefix: str, index: int, count: int) -> str:
    """A committed shard's file name, as Beam's sinks name theirs: ``results-00000-of-00004.parquet``."""
    return f"{prefix}-{index:05d}-of-{count:05d}.parquet"
