"""``beamvision <command>``: dispatch to one module per command.

Command modules are imported only when run, so ``beamvision --help`` is quick.
User mistakes (``UsageError``, ``ModelError``) print one line and exit 2; a
run with too many errors (``exits.RunFailed``) one line and its status; an
interrupt (SIGINT, SIGTERM) one line saying what was kept and how to go on,
and exits 130 or 143 (the table is ``beamvision.exits``); storage that cannot be
reached (``storage.StorageUnreachable``) one line and exits 1.
``console_main`` is the console script (and ``python -m beamvision``, and the
Flex Template's entry point): it starts quiet (``beamvision.console``) before
anything is imported, unless ``--verbose``; ``main`` runs one command in the
calling process, as the tests do.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

from beamvision import __version__, console, exits

# name -> (module in beamvision.pipelines, one-line description)
COMMANDS = {
    "models": ("list_models", "list the architectures: input sizes, preprocessing, parameters"),
    "export": ("export", "pack an architecture and its weights into a model artifact"),
    "import": ("import_model", "a model of your own (Keras .keras or .h5, a SavedModel) as a model artifact"),
    "prepare": ("prepare", "labelled images to split TFRecord shards for training (Beam)"),
    "train": ("train", "prepared TFRecords to a trained, evaluated model artifact (Keras)"),
    "tune": ("tune", "search train's flags: trials train side by side in Beam workers, best kept"),
    "optimize": ("optimize", "a model to one that runs INT8 on OpenVINO, within --max_drop of fp32 (NNCF)"),
    "convert": ("convert", "a model artifact for serving: SavedModel (TF Serving, Vertex AI), TFLite, ONNX"),
    "serve": ("serve", "a model artifact over HTTP: classify endpoint and Label Studio ML backend"),
    "classify": ("classify", "classify image collections in storage into Parquet results (Beam)"),
    "compact": ("compact", "fold an incremental catalog's completed runs into one partition per model"),
    "evaluate": ("evaluate", "score a classify output against ground truth"),
    "review": ("review", "a classify output as a static HTML report with thumbnails (Beam)"),
    "export-labels": ("export_labels", "classify results as Label Studio tasks with predictions, or CSV"),
    "demo": ("demo", "the whole loop on real handwritten digits: prepare, train, classify, evaluate"),
}

USAGE = "usage: beamvision [-h] [--version] <command> [<args>]"
# Neither these nor any --help load TensorFlow: they start without the stderr filter's process.
QUICK_COMMANDS = ("-h", "--help", "--version", "models")


def _help() -> str:
    width = max(map(len, COMMANDS))
    lines = [USAGE, "", "Distributed batch image classification on Apache Beam and Keras.", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "Run 'beamvision <command> --help' for a command's flags."]
    return "\n".join(lines)


def console_main(argv: list[str] | None = None) -> None:
    """The ``beamvision`` program: a quiet start unless ``--verbose``, then ``main``, then exit."""
    argv = sys.argv[1:] if argv is None else list(argv)
    loads_libraries = argv and argv[0] not in QUICK_COMMANDS and not {"-h", "--help"} & set(argv)
    if loads_libraries and not console.requested(argv, "--verbose"):
        console.quiet_stderr()
    exits.own_the_process(spare=console.filter_pids)
    status = main(argv)
    # The command is over (after an interrupt, Beam's worker processes are stopped: exits.settle).
    # Threads that Beam's runners and RunInference leave behind can keep a process from exiting
    # (a flex launch once hung there for 10 minutes after its summary): it ends without waiting for
    # them, its output flushed and the stderr filter let go first.
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    console.release_stderr()
    os._exit(status)


def main(argv: list[str] | None = None) -> int:
    """Runs one beamvision command; returns the process exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # Before the command's module is imported: TensorFlow reads its log level when it loads.
    console.configure(console.requested(argv, "--verbose"), console.requested(argv, "--quiet"))
    # Progress lines must show as they happen, also when output goes to a file or a pipe.
    sys.stdout.reconfigure(line_buffering=True)
    if not argv or argv[0] in ("-h", "--help"):
        print(_help())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"beamvision {__version__}")
        return 0
    command = argv[0]
    if command not in COMMANDS:
        print(
            f"beamvision: error: unknown command {command!r} (choose from {', '.join(COMMANDS)})",
            file=sys.stderr,
        )
        return 2
    with exits.catch_signals() as received:
        try:
            return _run_command(command, argv[1:])
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt) and received.signum is None:
                received.signum = signal.SIGINT  # raised by another hand than our handler's
            if received.signum is None:
                raise
            exits.settle()
            print(received.line(command), file=sys.stderr)
            return received.status


def _run_command(command: str, argv: list[str]) -> int:
    """Imports and runs one command; its user mistakes and failed runs become one line and a status."""
    module = importlib.import_module(f"beamvision.pipelines.{COMMANDS[command][0]}")
    from beamvision.models import ModelError
    from beamvision.pipelines.flags import UsageError
    from beamvision.storage import StorageUnreachable

    try:
        module.run(argv)
    except (UsageError, ModelError, StorageUnreachable) as exc:
        message = str(exc)
        prefix = "" if message.startswith("beamvision") else f"beamvision {command}: error: "
        print(prefix + message, file=sys.stderr)
        return exits.Status.FAILED if isinstance(exc, StorageUnreachable) else exits.Status.USAGE
    except exits.RunFailed as exc:
        if str(exc):
            print(f"beamvision {command}: {exc}", file=sys.stderr)
        return exc.status
    return exits.Status.DONE


if __name__ == "__main__":
    console_main()
