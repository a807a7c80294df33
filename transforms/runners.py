"""What kind of runner a pipeline has: the one place that tells.

Beam takes runner names in any case, with or without ``Runner``
(``--runner dataflow``), and hands a pipeline a runner object whose class may
be another (``DirectRunner`` runs as ``SwitchingDirectRunner``). Every rule
that depends on the runner (where progress comes from, what ``--detach``
allows, which paths its workers can reach, how many SDK processes share a
machine) asks ``runner_kind`` instead of comparing names.
"""

from __future__ import annotations

import enum


class RunnerKind(enum.Enum):
    """Where a runner's workers run."""

    DIRECT = "direct"  # in this process or in processes it starts, on this machine
    PORTABLE = "portable"  # a job service's workers (Flink, Spark, Prism, a worker pool)
    DATAFLOW = "dataflow"  # Google Cloud Dataflow: a service; the job outlives this process


def kind_of(runner: str | None) -> RunnerKind:
    """The kind of a runner named as ``--runner`` takes it, or as its class is named (None: DirectRunner)."""
    name = (runner or "DirectRunner").lower()
    if "dataflow" in name:
        return RunnerKind.DATAFLOW
    if "direct" in name or "fnapirunner" in name:
        return RunnerKind.DIRECT
    return RunnerKind.PORTABLE


def runner_kind(pipeline) -> RunnerKind:
    """The kind of the runner a ``beam.Pipeline`` will run on."""
    return kind_of(type(pipeline.runner).__name__)


def runner_name(pipeline) -> str:
    """The runner as the user named it (``--runner``), for messages."""
    from apache_beam.options.pipeline_options import StandardOptions

    return str(pipeline.options.view_as(StandardOptions).runner or "DirectRunner")


def is_remote(pipeline) -> bool:
    """Whether the job runs on a service and outlives this process (Dataflow): followed by its metrics."""
    return runner_kind(pipeline) is RunnerKind.DATAFLOW


def sees_local_disk(pipeline) -> bool:
    """Whether the pipeline's workers can read and write this machine's local paths."""
    return runner_kind(pipeline) is RunnerKind.DIRECT
