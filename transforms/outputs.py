"""What a classify run writes under its ``--output``: the one home of those names.

    OUTPUT/results-SSSSS-of-NNNNN.parquet   one row per classified image
    OUTPUT/errors-SSSSS-of-NNNNN.parquet    one row per input that could not be classified
    OUTPUT/summary.json                     written last: the run's commit point

With ``--incremental``, OUTPUT is a root holding one Hive partition per run,
``OUTPUT/run=<ID>/``, each laid out as above. ``prepare`` writes its error
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


def summaries_pattern(root: str) -> str:
    """The glob of every incremental run's summary.json under a root."""
    return storage.join(glob.escape(root), f"{RUN_PARTITION}=*", SUMMARY_FILE)
