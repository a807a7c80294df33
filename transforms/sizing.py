"""Worker sizing: how many threads read, decode and run the model in each worker process.

A machine runs several SDK worker processes (Dataflow: one per vCPU, by
default, for Python; DirectRunner ``multi_processing``: ``--direct_num_workers``),
and each has its own model and its own thread pools. Sized by the machine's
cores instead of the process's share, they oversubscribe it: on 16 vCPUs, 16
processes each with 16 decode threads and a 16-thread TensorFlow pool. So the
CPU-bound counts follow the process's share of the machine:

- decode threads: cores / processes (at least 1): decoding is CPU-bound;
- inference threads: cores / processes; with ``--model_copies C`` (models
  shared by the machine's processes, Beam's ``model_copies``), cores / C per copy;
- read threads: ``READ_THREADS`` per process whatever the cores: reads wait on
  storage latency, not on the CPU, and ``--buffer_mb`` bounds their bytes.

GPU workers (Dataflow's ``--dataflow_service_options
worker_accelerator=type:T;count:1;install-nvidia-driver``) follow other
rules (``GpuWorkers``): one SDK process per machine, so one model per GPU
(the experiment ``no_use_multiple_sdk_containers`` is added when missing:
one process per vCPU would load a model each into the one GPU's memory),
its decode threads all the machine's cores, and batches of
``GPU_BATCH_SIZE`` unless ``--batch_size`` says otherwise. One GPU per
worker: more workers, not more GPUs per worker, is how the job scales
(a process's TensorFlow places the model on its first GPU).

Each flag (``--read_threads``, ``--decode_threads``, ``--inference_threads``)
overrides its rule. The launcher knows how many processes share a machine
(``processes_per_machine``, from the pipeline options); each worker counts its
own cores (``WorkerSizing.resolve``), since a Dataflow worker's machine is
not the launcher's. Pools are shared by every bundle thread of a process
(``concurrency.ThreadPoolDoFn``), so the counts hold per process.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from beamvision.transforms.runners import RunnerKind, kind_of

READ_THREADS = 16
CPU_BATCH_SIZE = 32  # images per inference batch on CPU workers
# On a GPU: a batch that keeps it busy and fits a T4's 16 GB with every registered architecture at its
# default input size (not measured here: no GPU was at hand).
GPU_BATCH_SIZE = 64
ACCELERATOR_OPTION = "worker_accelerator"  # Dataflow's service option (also accepted as an experiment)
PER_CORE = 0  # processes_per_machine: one SDK process per core, counted on the worker
# Dataflow's experiment for one multi-threaded SDK process per machine instead of one per vCPU.
ONE_SDK_PROCESS_EXPERIMENT = "no_use_multiple_sdk_containers"


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclasses.dataclass(frozen=True)
class Threads:
    """Thread counts of one worker process."""

    read: int
    decode: int
    inference: int


@dataclasses.dataclass(frozen=True)
class WorkerSizing:
    """How a worker process sizes its pools: processes per machine, and overrides (None: the rule)."""

    processes_per_machine: int = 1  # PER_CORE: one per core of the worker's machine
    read_threads: int | None = None
    decode_threads: int | None = None
    inference_threads: int | None = None
    model_copies: int | None = None  # models per machine shared by its processes; None: one per process

    def resolve(self, cores: int | None = None) -> Threads:
        """The thread counts on a machine of ``cores`` cores (default: this process's)."""
        cores = cores or available_cores()
        processes = cores if self.processes_per_machine == PER_CORE else self.processes_per_machine
        share = max(1, cores // processes)
        per_copy = max(1, cores // self.model_copies) if self.model_copies else share
        return Threads(
            read=self.read_threads or READ_THREADS,
            decode=self.decode_threads or share,
            inference=self.inference_threads or per_copy,
        )

    def threads(self, role: str) -> int:
        """One role's count on this worker (a ``Threads`` field); picklable with ``functools.partial``."""
        return getattr(self.resolve(), role)

    def for_pipeline(self, pipeline) -> WorkerSizing:
        """This sizing with the processes per machine of the pipeline's runner."""
        processes = processes_per_machine(pipeline.options, type(pipeline.runner).__name__)
        return dataclasses.replace(self, processes_per_machine=processes)

    def describe(self) -> dict[str, Any]:
        """For summary.json: each count as given, or ``"auto"`` where the rule decides on the worker."""
        processes = self.processes_per_machine
        return {
            "processes_per_machine": "one per core" if processes == PER_CORE else processes,
            "read_threads": self.read_threads or READ_THREADS,
            "decode_threads": self.decode_threads or "auto",
            "inference_threads": self.inference_threads or "auto",
            "model_copies": self.model_copies or "one per process",
        }


DEFAULT_SIZING = WorkerSizing()  # one process per machine, every count by its rule


@dataclasses.dataclass(frozen=True)
class GpuWorkers:
    """The GPUs a job asks each worker for: ``type`` (``nvidia-tesla-t4``) and ``count`` (0: none)."""

    type: str | None = None
    count: int = 0

    @classmethod
    def of(cls, pipeline_options) -> GpuWorkers:
        """From ``worker_accelerator=type:T;count:N;...`` among Dataflow's service options or experiments."""
        from apache_beam.options.pipeline_options import DebugOptions, GoogleCloudOptions

        given = [
            *(pipeline_options.view_as(GoogleCloudOptions).dataflow_service_options or []),
            *(pipeline_options.view_as(DebugOptions).experiments or []),
        ]
        for option in given:
            name, _, value = option.partition("=")
            if name.strip() != ACCELERATOR_OPTION:
                continue
            fields = dict(part.partition(":")[::2] for part in value.split(";") if part)
            count = fields.get("count", "1")
            if not count.isdigit():
                raise ValueError(f"{option}: count must be a number of GPUs")
            return cls(fields.get("type"), int(count))
        return cls()

    def __bool__(self) -> bool:
        return self.count > 0

    def batch_size(self, given: int | None) -> int:
        """``--batch_size`` if given, else this worker's default."""
        return given or (GPU_BATCH_SIZE if self else CPU_BATCH_SIZE)

    def one_process_per_machine(self, pipeline_options) -> bool:
        """Adds ``no_use_multiple_sdk_containers`` for GPU workers; whether it was added."""
        from apache_beam.options.pipeline_options import DebugOptions

        debug = pipeline_options.view_as(DebugOptions)
        if not self or ONE_SDK_PROCESS_EXPERIMENT in (debug.experiments or []):
            return False
        debug.add_experiment(ONE_SDK_PROCESS_EXPERIMENT)
        return True


def processes_per_machine(pipeline_options, runner: str | None = None) -> int:
    """How many SDK worker processes the runner starts on each machine (``PER_CORE``: one per core).

    DirectRunner: ``--direct_num_workers`` with ``multi_processing`` (0 means
    one per core), else 1 (threads of one process); DataflowRunner: one per
    vCPU unless ``--experiments no_use_multiple_sdk_containers``; portable
    runners (Flink, Spark, Prism): ``--sdk_worker_parallelism`` (0: one per core).
    """
    from apache_beam.options.pipeline_options import (
        DebugOptions,
        DirectOptions,
        PortableOptions,
        StandardOptions,
    )

    kind = kind_of(runner or pipeline_options.view_as(StandardOptions).runner)
    if kind is RunnerKind.DATAFLOW:
        experiments = pipeline_options.view_as(DebugOptions).experiments or []
        return 1 if ONE_SDK_PROCESS_EXPERIMENT in experiments else PER_CORE
    if kind is RunnerKind.DIRECT:
        direct = pipeline_options.view_as(DirectOptions)
        if direct.direct_running_mode != "multi_processing":
            return 1
        return PER_CORE if direct.direct_num_workers == 0 else direct.direct_num_workers
    parallelism = pipeline_options.view_as(PortableOptions).sdk_worker_parallelism
    return PER_CORE if parallelism == 0 else int(parallelism or 1)
