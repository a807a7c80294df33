"""Worker sizing: thread counts follow the process's share of the machine, per runner, and reach the pools."""

from __future__ import annotations

import concurrent.futures
import threading

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that

from beamvision.pipelines.cli import main
from beamvision.transforms.concurrency import ThreadPoolDoFn
from beamvision.transforms.sizing import (
    CPU_BATCH_SIZE,
    GPU_BATCH_SIZE,
    PER_CORE,
    READ_THREADS,
    GpuWorkers,
    Threads,
    WorkerSizing,
    processes_per_machine,
)


@pytest.mark.parametrize(
    ("sizing", "cores", "expected"),
    [
        # One process owns the machine (DirectRunner in one process, or one SDK process per VM).
        (WorkerSizing(processes_per_machine=1), 16, Threads(READ_THREADS, 16, 16)),
        # Dataflow's default: one process per vCPU, each with one core's worth of threads.
        (WorkerSizing(processes_per_machine=PER_CORE), 16, Threads(READ_THREADS, 1, 1)),
        (WorkerSizing(processes_per_machine=4), 16, Threads(READ_THREADS, 4, 4)),
        # More processes than cores still leaves each one thread.
        (WorkerSizing(processes_per_machine=8), 2, Threads(READ_THREADS, 1, 1)),
        # Two models shared by the machine's 16 processes: each copy computes on half the cores.
        (WorkerSizing(processes_per_machine=PER_CORE, model_copies=2), 16, Threads(READ_THREADS, 1, 8)),
        # Flags win over the rules.
        (
            WorkerSizing(PER_CORE, read_threads=4, decode_threads=3, inference_threads=2),
            16,
            Threads(4, 3, 2),
        ),
    ],
)
def test_threads_are_the_process_share_of_the_machine(sizing, cores, expected):
    assert sizing.resolve(cores) == expected


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], 1),
        (["--direct_num_workers", "4"], 1),  # multi-threading: threads of one process
        (["--direct_num_workers", "4", "--direct_running_mode", "multi_processing"], 4),
        (["--direct_num_workers", "0", "--direct_running_mode", "multi_processing"], PER_CORE),
        (["--runner", "DataflowRunner"], PER_CORE),
        (["--runner", "DataflowRunner", "--experiments", "no_use_multiple_sdk_containers"], 1),
        (["--runner", "FlinkRunner", "--sdk_worker_parallelism", "3"], 3),
        (["--runner", "PortableRunner"], 1),
        # Beam takes runner names in any case, with or without "Runner".
        (["--runner", "dataflow"], PER_CORE),
        (["--runner", "direct", "--direct_num_workers", "3", "--direct_running_mode", "multi_processing"], 3),
    ],
)
def test_processes_per_machine_follow_the_runner(argv, expected):
    assert processes_per_machine(PipelineOptions(argv)) == expected


def test_summary_describes_what_the_worker_decides():
    described = WorkerSizing(PER_CORE, decode_threads=2).describe()
    assert described == {
        "processes_per_machine": "one per core",
        "read_threads": READ_THREADS,
        "decode_threads": 2,
        "inference_threads": "auto",
        "model_copies": "one per process",
    }


class _ThreadNames(ThreadPoolDoFn):
    def __init__(self, threads: int = 3):
        super().__init__(threads=lambda: threads, depth=8, ok_counter="test_ok", failed_counter="test_failed")

    def work(self, element) -> list:
        return [threading.current_thread().name]


def test_instances_in_a_process_share_one_pool_of_the_sized_count():
    first, second = _ThreadNames(), _ThreadNames()
    first.setup()
    second.setup()
    assert first._pool is second._pool and first._pool._max_workers == 3
    first.teardown()
    assert not first._pool._shutdown  # still the second instance's
    second.teardown()
    assert second._pool._shutdown


def test_pipeline_work_runs_on_the_sized_threads():
    def on_one_pool_thread(names):
        assert len(names) == 40 and len(set(names)) == 1 and names[0].startswith("_ThreadNames"), set(names)

    with TestPipeline() as p:
        assert_that(p | beam.Create(range(40)) | beam.ParDo(_ThreadNames(threads=1)), on_one_pool_thread)


def _classify_dofns(argv: list[str]) -> dict[str, object]:
    """The DoFns of classify's read, decode and inference steps, as its job graph holds them."""
    from beamvision.models import create_model
    from beamvision.models.artifact import new_manifest
    from beamvision.pipelines import classify, flags

    args, pipeline_options = flags.parse_pipeline_args(
        "t", "t", classify.add_arguments, ["--input", "x/*", "--model", "m", "--output", "o", *argv]
    )
    model = create_model("squeezenet", num_classes=3, input_size=32)
    pipeline = beam.Pipeline(options=pipeline_options)
    classify.build_pipeline(
        pipeline,
        classify.Config.from_args(args),
        new_manifest(model, "squeezenet", ["a", "b", "c"], "none"),
    )
    found = {}

    class Visitor(beam.pipeline.PipelineVisitor):
        def visit_transform(self, applied):
            fn = getattr(applied.transform, "fn", None)
            fn = getattr(fn, "_fn", fn)  # RunInference's DoFn, inside Beam's exception-handling wrapper
            if fn is not None:
                found[type(fn).__name__] = fn

    pipeline.visit(Visitor())
    return found


def test_the_flags_reach_the_workers_steps():
    dofns = _classify_dofns(["--read_threads", "5", "--decode_threads", "3", "--inference_threads", "2"])
    assert (
        dofns["_LookUpFn"]._threads(),
        dofns["_ReadFileFn"]._threads(),
        dofns["_DecodeFn"]._threads(),
    ) == (
        5,
        5,
        3,
    )
    handler = dofns["_RunInferenceDoFn"]._model_handler._unkeyed
    assert handler._sizing.resolve().inference == 2


def test_with_a_process_per_core_each_gets_one_core_of_threads():
    # As on Dataflow (one SDK process per vCPU; its runner's options map to the same, tested above).
    per_core = ["--direct_running_mode", "multi_processing", "--direct_num_workers", "0"]
    dofns = _classify_dofns([*per_core, "--model_copies", "1"])
    assert dofns["_DecodeFn"]._threads() == 1  # whatever this machine's cores
    handler = dofns["_RunInferenceDoFn"]._model_handler._unkeyed
    assert handler._sizing.processes_per_machine == PER_CORE and handler.model_copies() == 1
    assert handler.share_model_across_processes()


def test_openvino_computes_on_the_given_threads(tmp_path):
    from beamvision.models import create_model
    from beamvision.models.artifact import Artifact, new_manifest
    from beamvision.transforms.engines import OpenVINOEngine

    model = create_model("squeezenet", num_classes=3, input_size=32)
    artifact = Artifact(str(tmp_path), model, new_manifest(model, "squeezenet", ["a", "b", "c"], "none"))
    classifier = OpenVINOEngine(artifact, batch_size=2, top_k=2, embeddings=False, threads=1)
    assert classifier._compiled.get_property("INFERENCE_NUM_THREADS") == 1
    # One model serves several threads at once (bundle threads; every process with --model_copies).
    rng = np.random.default_rng(0)
    batches = [list(rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)) for _ in range(8)]
    alone = [classifier(batch) for batch in batches]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(classifier, batches * 4))
    for got, expected in zip(together, alone * 4, strict=True):
        assert [p.labels for p in got] == [p.labels for p in expected]
        np.testing.assert_allclose([p.scores for p in got], [p.scores for p in expected], rtol=1e-5)


@pytest.mark.parametrize(
    ("flag", "value"), [("--decode_threads", "0"), ("--read_threads", "x"), ("--model_copies", "-1")]
)
def test_bad_sizing_flags_are_one_line_errors(flag, value, capsys):
    argv = ["classify", "--input", "x", "--model", "m", "--output", "o", flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err and repr(value) in err and "Traceback" not in err


def test_tensorflow_workers_compute_on_the_given_threads(tmp_path):
    """In a fresh worker process, the pools are sized before loading the model starts TensorFlow."""
    import subprocess
    import sys

    from beamvision.models import create_model
    from beamvision.models.artifact import new_manifest, save_artifact

    model = create_model("squeezenet", num_classes=3, input_size=32)
    save_artifact(model, new_manifest(model, "squeezenet", ["a", "b", "c"], "none"), str(tmp_path / "m"))
    script = (
        "import tensorflow as tf\n"
        "from beamvision.transforms.inference import BeamvisionModelHandler\n"
        "from beamvision.transforms.sizing import WorkerSizing\n"
        f"uri = {str(tmp_path / 'm')!r}\n"
        "handler = BeamvisionModelHandler(uri, 2, 2, sizing=WorkerSizing(inference_threads=1))\n"
        "handler.load_model()\n"
        "threading = tf.config.threading\n"
        "print(threading.get_intra_op_parallelism_threads(), threading.get_inter_op_parallelism_threads())\n"
    )
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.split() == ["1", "1"]


T4 = "worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], GpuWorkers()),
        ([f"--dataflow_service_options={T4}"], GpuWorkers("nvidia-tesla-t4", 1)),
        (["--experiments", "worker_accelerator=type:nvidia-l4"], GpuWorkers("nvidia-l4", 1)),  # the older way
        (["--dataflow_service_options", "worker_accelerator=type:nvidia-tesla-a100;count:2"], None),
    ],
)
def test_gpu_workers_are_read_from_dataflow_service_options(argv, expected):
    gpus = GpuWorkers.of(PipelineOptions(argv))
    if expected is None:
        assert (gpus.type, gpus.count) == ("nvidia-tesla-a100", 2)
        return
    assert gpus == expected
    options = PipelineOptions(["--runner", "DataflowRunner", *argv])
    assert gpus.batch_size(None) == (GPU_BATCH_SIZE if gpus else CPU_BATCH_SIZE) and gpus.batch_size(8) == 8
    # One SDK process per GPU machine (one model on its GPU), added once; CPU workers keep one per vCPU.
    assert gpus.one_process_per_machine(options) is bool(gpus)
    assert gpus.one_process_per_machine(options) is False
    assert processes_per_machine(options) == (1 if gpus else PER_CORE)


def test_a_dataflow_job_on_gpu_workers_runs_one_process_per_machine_at_the_gpu_batch(tmp_path):
    from beamvision.models import create_model
    from beamvision.models.artifact import new_manifest, save_artifact
    from beamvision.pipelines import classify

    model = create_model("squeezenet", num_classes=3, input_size=32)
    save_artifact(model, new_manifest(model, "squeezenet", ["a", "b", "c"], "none"), str(tmp_path / "m"))
    argv = ["--input", "gs://bucket/photos/**", "--model", str(tmp_path / "m"), "--output", "gs://bucket/out"]
    argv += ["--runner", "DataflowRunner", "--project", "beamvision-test", "--region", "us-central1"]
    argv += ["--temp_location", "gs://bucket/tmp", f"--dataflow_service_options={T4}", "--dry_run"]
    from apache_beam.options.pipeline_options import DebugOptions, GoogleCloudOptions

    options = classify.run(argv).job.options  # what the job Dataflow would be sent is made of
    assert "no_use_multiple_sdk_containers" in options.view_as(DebugOptions).experiments
    assert options.view_as(GoogleCloudOptions).dataflow_service_options == [T4]
    dofns = _classify_dofns([f"--dataflow_service_options={T4}"])
    assert dofns["_RunInferenceDoFn"]._model_handler._unkeyed._batch_size == GPU_BATCH_SIZE
    assert _classify_dofns([])["_RunInferenceDoFn"]._model_handler._unkeyed._batch_size == CPU_BATCH_SIZE


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--engine", "openvino", f"--dataflow_service_options={T4}"],
            "--engine openvino: computes on the CPU, not on the workers' nvidia-tesla-t4; "
            "GPU workers run --engine tensorflow",
        ),
        (
            ["--dataflow_service_options=worker_accelerator=type:nvidia-l4;count:4"],
            "--dataflow_service_options worker_accelerator=...count:4: beamvision runs one model on one GPU "
            "per worker; ask for count:1 and more workers (--max_num_workers)",
        ),
        (
            ["--dataflow_service_options=worker_accelerator=type:nvidia-l4;count:two"],
            "--dataflow_service_options worker_accelerator=type:nvidia-l4;count:two: "
            "count must be a number of GPUs",
        ),
    ],
)
def test_gpu_workers_refuse_what_cannot_use_them_in_one_line(flags, message, tmp_path, capsys):
    from beamvision.models import create_model
    from beamvision.models.artifact import new_manifest, save_artifact

    model = create_model("squeezenet", num_classes=3, input_size=32)
    save_artifact(model, new_manifest(model, "squeezenet", ["a", "b", "c"], "none"), str(tmp_path / "m"))
    argv = ["classify", "--input", "gs://b/x/*", "--model", str(tmp_path / "m"), "--output", "gs://b/o"]
    assert main([*argv, *flags, "--runner", "DataflowRunner", "--dry_run"]) == 2
    assert capsys.readouterr().err.strip() == f"beamvision classify: error: {message}"
