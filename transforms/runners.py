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

# The runners a user picks from, as an unknown --runner's message lists them. Beam knows a few
# more (FnApiRunner, InteractiveRunner, the test runners) and takes them too.
RUNNERS = ("DirectRunner", "PrismRunner", "FlinkRunner", "SparkRunner", "PortableRunner", "DataflowRunner")


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


def is_known_runner(name: str) -> bool:
    """Whether Beam can make the runner ``--runner`` names: any case, ``Runner`` optional, or a class path."""
    from apache_beam.options.pipeline_options import StandardOptions

    if "." in name:  # a runner class by its module path
        return True
    known = {runner.lower() for runner in StandardOptions.KNOWN_RUNNER_NAMES}
    return name.lower() in known or f"{name.lower()}runner" in known


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
