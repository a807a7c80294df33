"""What kind of runner a pipeline has: the one place that tells.

Beam takes runner names in any case, with or without ``Runner``
(``--runner dataflow``), and hands a pipeline a runner object whose class may
be another (``DirectRunner`` runs as ``SwitchingDirectRunner``). Every rule
that depends on the runner (where progress comes from, what ``--detach``
allows, which paths its workers can reach, how many SDK processes share a
machine) asks ``runner_kind`` instead of comparing names.

Every command makes its pipeline with ``new_pipeline``. There
``DirectRunner`` (the default) is Beam's FnApiRunner, made as Beam's
``DirectRunner`` makes it for a batch job. Beam's own ``DirectRunner`` first
hands the job to Prism, a Go runner it downloads at run time, and falls back
to the FnApiRunner only when that fails (offline, as in the test suite), so
a connected machine would run another runner than the tests. Prism stays
available by name: ``--runner PrismRunner`` (``--prism_location`` a local
binary or a release URL).
"""

from __future__ import annotations

import enum

import apache_beam as beam

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


def new_pipeline(options) -> beam.Pipeline:
    """The ``beam.Pipeline`` of a command: on the runner ``--runner`` names, DirectRunner without Prism."""
    from apache_beam.options.pipeline_options import StandardOptions

    runner = options.view_as(StandardOptions).runner
    if runner is None or runner.lower() in ("direct", "directrunner"):
        return beam.Pipeline(runner=_fn_api_runner(options), options=options)
    return beam.Pipeline(options=options)


def _fn_api_runner(options):
    """Beam's FnApiRunner as Beam's DirectRunner makes it for a batch job (its workers get the options)."""
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    info = fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
    return fn_runner.FnApiRunner(provision_info=info)


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
    """Whether the pipeline's workers can read and write this machine's local paths.

    Direct runners' workers do; a portable runner's do when they run on this
    machine: ``--environment_type LOOPBACK`` (in this process; the default of
    Prism and of Flink and Spark embedded in the job server), ``EXTERNAL`` at
    a loopback address (a worker pool here), or ``PROCESS`` started by a job
    service here. Docker containers (the portable default) and Dataflow's
    workers do not.
    """
    kind = runner_kind(pipeline)
    if kind is not RunnerKind.PORTABLE:
        return kind is RunnerKind.DIRECT
    from apache_beam.options.pipeline_options import PortableOptions

    portable = pipeline.options.view_as(PortableOptions)
    environment = (portable.environment_type or _default_environment(pipeline)).upper()
    if environment == "LOOPBACK":
        return True
    if environment == "EXTERNAL":
        return _is_loopback(portable.environment_config)
    if environment == "PROCESS":
        return portable.job_endpoint is None or _is_loopback(portable.job_endpoint)
    return False


def _default_environment(pipeline) -> str:
    """The environment a portable runner picks when none is given: Beam's own rules, by runner."""
    import re

    from apache_beam.options.pipeline_options import FlinkRunnerOptions, SparkRunnerOptions
    from apache_beam.runners.portability import flink_runner, spark_runner

    options, name = pipeline.options, type(pipeline.runner).__name__.lower()
    local = {
        "prism": lambda: True,
        "flink": lambda: options.view_as(FlinkRunnerOptions).flink_master in flink_runner.MAGIC_HOST_NAMES,
        "spark": lambda: bool(
            re.match(spark_runner.LOCAL_MASTER_PATTERN, options.view_as(SparkRunnerOptions).spark_master_url)
        ),
    }
    embedded = next((test for key, test in local.items() if key in name), lambda: False)
    return "LOOPBACK" if embedded() else "DOCKER"


def _is_loopback(address: str | None) -> bool:
    """Whether ``host:port`` names this machine's loopback interface."""
    host = (address or "").rsplit(":", 1)[0].strip("[]").lower()
    return host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")
