"""Command-line machinery: parsing, value types, Beam's pass-through, and the flag groups commands share.

Each command module declares its own flags (``add_arguments(parser)``) and
turns them into its frozen ``Config`` (``Config.from_args``); this module
holds what several of them use: the parser that fails in one line
(``UsageError``), the value types (``beamvision.values``' checks as argparse
types), on/off switches, ``parse`` for plain commands and
``parse_pipeline_args`` for Beam pipelines (their own flags first, the rest
checked against Beam's option classes), and the groups of flags that more
than one command takes (architecture, artifact identity, decoding limits,
worker sizing, engine and precision, progress and ``--detach``, ``--results``).

User mistakes raise ``UsageError`` with one line naming the flag and the value
received; the CLI prints it and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from apache_beam.options.pipeline_options import PipelineOptions

from beamvision import storage, values
from beamvision.console import DEFAULT_PROGRESS_SECONDS, boolean
from beamvision.models import ModelArgumentError, get_spec, list_models
from beamvision.transforms.concurrency import DEFAULT_BUFFER_MB
from beamvision.transforms.decode import DEFAULT_MAX_PIXELS
from beamvision.transforms.engines import CONVERTED_ENGINES, DEFAULT_ENGINE, ENGINES, PRECISIONS
from beamvision.transforms.runners import RUNNERS, is_known_runner
from beamvision.transforms.sizing import READ_THREADS, WorkerSizing

AddArguments = Callable[[argparse.ArgumentParser], None]


class UsageError(Exception):
    """A flag or value the user gave cannot be used. The message is one line."""


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that raises ``UsageError`` instead of printing usage and exiting."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: error: {message}")


def value_type(check: values.Check, name: str | None = None) -> Callable[[str], Any]:
    """A ``beamvision.values`` check as an argparse type: its message becomes the flag's error."""

    def parse(text: str) -> Any:
        try:
            return check(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = name or getattr(check, "__name__", "value")
    return parse


positive_int = value_type(values.positive_int, "positive_int")
fraction = value_type(values.fraction, "fraction")
positive_float = value_type(values.positive_float, "positive_float")
share = value_type(values.share, "share")
accuracy_points = value_type(values.accuracy_points, "accuracy_points")
# Real buckets hold a few corrupt or odd files in a thousand; a systematic fault (no
# permission, a wrong model or --input, a full disk) fails most inputs. One in ten is far from both.
DEFAULT_MAX_ERROR_RATE = 0.1


def add_switch(parser: argparse.ArgumentParser, flag: str, help: str) -> None:
    """An on/off flag: bare (on), or with a value, ``--flag=true`` / ``--flag=false`` / 1 / 0."""
    parser.add_argument(
        flag, type=boolean, nargs="?", const=True, default=False, metavar="true|false", help=help
    )


def _summary(doc_line: str) -> str:
    """A module docstring's first line without its leading ``command``: label, for --help."""
    return doc_line.split(": ", 1)[1] if doc_line.startswith("``") and ": " in doc_line else doc_line


def parse(
    prog: str, description: str, add_arguments: AddArguments, argv: list[str] | None
) -> argparse.Namespace:
    """Parses ``argv`` with the flags ``add_arguments`` declares; unknown flags are errors.

    Every command also takes ``--quiet`` and ``--verbose`` (declared and
    checked here; the CLI reads them before any import, see ``beamvision.console``).
    """
    # No abbreviations: the CLI reads --quiet and --verbose before parsing, by their full names.
    parser = OneLineParser(prog=prog, description=_summary(description), allow_abbrev=False)
    add_arguments(parser)
    _add_verbosity_arguments(parser)
    return parser.parse_args(argv)


def parse_pipeline_args(
    prog: str, description: str, add_arguments: AddArguments, argv: list[str] | None
) -> tuple[argparse.Namespace, PipelineOptions]:
    """Parses a pipeline's own flags, then Beam's, refusing unknown flags and bad values in one line.

    The pipeline's flags are consumed here and never reach Beam (prepare's
    ``--labels`` would clash with Dataflow's job ``--labels``). What remains
    is checked against every Beam ``PipelineOptions`` class, as Beam itself
    declares them, so a typo in a Beam flag is an error, not silently ignored;
    so is a ``--runner`` that Beam cannot make.
    """
    argv = _normalise_dry_run(sys.argv[1:] if argv is None else list(argv))
    parser = OneLineParser(
        prog=prog,
        description=_summary(description),
        allow_abbrev=False,
        epilog="Beam pipeline options pass through: --runner, --direct_num_workers, --direct_running_mode, "
        "--project, --region, --temp_location, --setup_file, --sdk_container_image, ...",
    )
    add_arguments(parser)
    _add_verbosity_arguments(parser)
    args, beam_argv = parser.parse_known_args(argv)
    beam_parser = _BeamFlagsParser(prog=prog, allow_abbrev=False)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(beam_parser)
    runner = beam_parser.parse_args(beam_argv).runner
    if runner is not None and not is_known_runner(runner):
        raise UsageError(f"--runner {runner}: unknown runner; choose from {', '.join(RUNNERS)}")
    options = PipelineOptions(beam_argv)
    if runner is not None and "prism" in runner.lower():
        _check_prism(runner, options)
    return args, options


def _check_prism(runner: str, options: PipelineOptions) -> None:
    """Fetches (or finds in Beam's cache) the Prism binary now: a bad path or no network is one line.

    Beam does the same when the job starts, with a traceback; the binary is
    cached under ~/.apache_beam/cache/prism, so the job's own lookup is quick.
    """
    from apache_beam.options.pipeline_options import PrismRunnerOptions
    from apache_beam.runners.portability.prism_runner import PrismJobServer

    from beamvision.storage import StorageUnreachable

    releases = "https://github.com/apache/beam/releases"

    location = options.view_as(PrismRunnerOptions).prism_location
    try:
        PrismJobServer(options)._get_executable_path()
    except ValueError:  # Beam's words for a path that is not there, or a URL not of a Beam release
        what = "not a Beam release's URL" if "://" in (location or "") else "no such file"
        raise UsageError(
            f"--prism_location {location}: {what}; give a Prism binary, its release zip, or the URL of "
            f"either on {releases}"
        ) from None
    except (OSError, RuntimeError) as exc:  # the download (Beam wraps urllib's errors in RuntimeError)
        where = f"--prism_location {location}" if location else "Beam's Prism release"
        raise StorageUnreachable(
            f"--runner {runner}: could not fetch {where} ({str(exc).splitlines()[0]}); "
            "pass --prism_location with a local Prism binary, or leave out --runner to run on this machine "
            "without Prism"
        ) from None


def _add_verbosity_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    add_switch(group, "--quiet", "print no progress, only warnings, errors and the final summary")
    add_switch(
        group, "--verbose", "show what TensorFlow, absl and Beam log (hidden by default), from INFO up"
    )


class _BeamFlagsParser(OneLineParser):
    """Checks the flags left for Beam against Beam's own option classes, with public argparse only.

    Beam's option classes declare templated flags with
    ``add_value_provider_argument``, a method of Beam's private parser; to check
    a flag's name and value, it is an ordinary argument.
    """

    def add_value_provider_argument(self, *args, **kwargs):
        if not args[0].startswith("-"):  # Beam makes positional template arguments optional
            kwargs.setdefault("nargs", "?")
        self.add_argument(*args, **kwargs)

    def error(self, message: str):
        if not message.startswith("ambiguous option: "):  # as Beam's parser: never guess a prefix
            super().error(message)


def _normalise_dry_run(argv: list[str]) -> list[str]:
    """Beam's ``--dry_run`` as one of our switches: bare, true/false or 1/0.

    Beam's own flag takes any text and treats every non-empty value as true, so
    ``--dry_run=false`` from a launcher would be a dry run; here it is dropped.
    """
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--dry_run" or arg.startswith("--dry_run="):
            if "=" in arg:
                text = arg.split("=", 1)[1]
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                i += 1
                text = argv[i]
            else:
                text = "true"
            try:
                if boolean(text):
                    out.append("--dry_run=True")
            except argparse.ArgumentTypeError as exc:
                raise UsageError(f"argument --dry_run: {exc}") from None
        else:
            out.append(arg)
        i += 1
    return out


# --- checks that name the flag ----------------------------------------------------------------


def model_argument_error(exc: ModelArgumentError, flags: dict[str, str] | None = None) -> UsageError:
    """A ``ModelArgumentError`` as the UsageError of the flag that set the argument.

    A model argument is set by the flag of the same name (``--input_size``);
    ``flags`` maps an argument that a command sets with another flag to that
    flag and its value, as the message should name them.
    """
    source = (flags or {}).get(exc.argument, f"--{exc.argument} {exc.value}")
    return UsageError(f"{source}: {exc.reason}")


def check_model_arguments(architecture: str, flags: dict[str, str] | None = None, **arguments) -> None:
    """``ArchitectureSpec.check_arguments``, failing with a UsageError that names the flag (see above)."""
    try:
        get_spec(architecture).check_arguments(**arguments)
    except ModelArgumentError as exc:
        raise model_argument_error(exc, flags) from None


def check_file_exists(flag: str, uri: str | None) -> None:
    """A file a flag names must exist (Beam would otherwise fail with a traceback building the pipeline)."""
    if uri is not None and not storage.exists(uri):
        raise UsageError(f"{flag} {uri}: no such file")


# --- flags shared by several commands -----------------------------------------------------------

check_architecture = values.one_of(list_models())
check_engine = values.one_of(CONVERTED_ENGINES)


def check_engines(value: Any) -> tuple[str, ...]:
    """``--engines`` as a file gives it (tune's space): one engine name."""
    return (check_engine(value),)


def add_architecture_argument(
    parser: argparse.ArgumentParser, default: str | None = None, otherwise: str | None = None
) -> None:
    """``--architecture``: required, unless it has a ``default`` or ``otherwise`` says where it comes from."""
    parser.add_argument(
        "--architecture",
        required=default is None and otherwise is None,
        default=default,
        type=value_type(check_architecture, "architecture"),
        choices=list_models(),
        metavar="NAME",
        help=f"one of: {', '.join(list_models())}"
        + (f" (default {default})" if default else f" (default: {otherwise})" if otherwise else ""),
    )


def add_artifact_identity_arguments(
    parser: argparse.ArgumentParser, made_by: str, name_default: str = "the architecture"
) -> None:
    """--name, --version, --overwrite and --engines of a command that writes a model artifact."""
    parser.add_argument("--name", help=f"model name recorded in results (default: {name_default})")
    parser.add_argument("--version", help=f"model version recorded in results (default: {made_by} time, UTC)")
    add_switch(parser, "--overwrite", "replace an existing artifact at --output")
    parser.add_argument(
        "--engines",
        nargs="+",
        type=value_type(check_engine, "engine"),
        choices=CONVERTED_ENGINES,
        default=[],
        metavar="ENGINE",
        help="also store the model converted for these engines (openvino), so that classify "
        "--engine openvino workers do not convert it at start-up",
    )


def add_decode_arguments(parser: argparse.ArgumentParser) -> None:
    """The limits of reading and decoding, shared by classify, prepare and serve."""
    parser.add_argument(
        "--max_pixels",
        type=positive_int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help=f"larger images (width x height) are DecompressionBomb errors (default {DEFAULT_MAX_PIXELS:,})",
    )
    parser.add_argument(
        "--buffer_mb",
        type=positive_int,
        default=DEFAULT_BUFFER_MB,
        metavar="MB",
        help="file bytes and full-size pixels each worker process holds while reading and decoding "
        f"(default {DEFAULT_BUFFER_MB}); a larger file is still read, alone",
    )


def add_worker_arguments(parser: argparse.ArgumentParser, inference: bool) -> None:
    """How each worker process sizes its threads (beamvision.transforms.sizing): classify, prepare."""
    parser.add_argument(
        "--read_threads",
        type=positive_int,
        metavar="N",
        help=f"files each worker process reads at once (default {READ_THREADS}: reads wait on storage, "
        "not on the CPU)",
    )
    parser.add_argument(
        "--decode_threads",
        type=positive_int,
        metavar="N",
        help="decoding threads per worker process (default: the process's share of the machine's cores, "
        "cores / processes per machine)",
    )
    if not inference:
        return
    parser.add_argument(
        "--inference_threads",
        type=positive_int,
        metavar="N",
        help="threads that compute each batch (default: the process's share of the cores, or with "
        "--model_copies, cores / copies)",
    )
    parser.add_argument(
        "--model_copies",
        type=positive_int,
        metavar="N",
        help="load N models per machine, shared by all its worker processes (Beam's model_copies; 1 is "
        "Beam's large_model), instead of one per process: for models too large to hold once per vCPU",
    )


def worker_sizing(args: argparse.Namespace) -> WorkerSizing:
    """The sizing flags as given; the processes per machine follow the runner (``build_pipeline``)."""
    return WorkerSizing(
        read_threads=args.read_threads,
        decode_threads=args.decode_threads,
        inference_threads=getattr(args, "inference_threads", None),
        model_copies=getattr(args, "model_copies", None),
    )


def add_progress_arguments(parser: argparse.ArgumentParser) -> None:
    """--progress_every and --detach, of the commands that run with a progress line (``launch``)."""
    parser.add_argument(
        "--progress_every",
        type=positive_float,
        default=DEFAULT_PROGRESS_SECONDS,
        metavar="SECONDS",
        help="seconds between progress lines when stderr is not a terminal "
        f"(default {DEFAULT_PROGRESS_SECONDS:g}; a terminal gets one line, redrawn)",
    )
    add_switch(
        parser,
        "--detach",
        "with a remote runner (Dataflow): return once the job is submitted, after printing its console URL; "
        "the job still writes its summary to --output",
    )


def add_error_rate_argument(parser: argparse.ArgumentParser) -> None:
    """--max_error_rate of classify and prepare, whose inputs end as rows (``launch.check_errors``)."""
    parser.add_argument(
        "--max_error_rate",
        type=share,
        default=DEFAULT_MAX_ERROR_RATE,
        metavar="SHARE",
        help="exit with status 3 (after writing every row) when more than this share of the inputs "
        f"failed, or when all did (default {DEFAULT_MAX_ERROR_RATE:g}; 1: only when all did)",
    )


def add_results_argument(parser: argparse.ArgumentParser) -> None:
    """--results: a classify output, read by evaluate, review and export-labels."""
    parser.add_argument(
        "--results", required=True, metavar="DIR", help="output directory of beamvision classify"
    )


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """--engine, --precision and --threshold: how a model computes, in classify and serve."""
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default=DEFAULT_ENGINE,
        help="how batches are computed: tensorflow (default) or openvino (the same model, converted on "
        "each worker; faster on Intel CPUs)",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32 (default), bf16, or auto: bf16 where the CPU computes it natively (AVX512_BF16, AMX)",
    )
    parser.add_argument(
        "--threshold",
        type=share,
        metavar="X",
        help="a multi-label model only: every class's threshold for this run, in [0, 1] (default: each "
        "class's own, from the model's manifest); the labels column holds the classes at or above it",
    )


def check_engine_arguments(model: str, manifest, engine: str, threshold: float | None) -> None:
    """Refuses an ``--engine`` that cannot run the artifact, and ``--threshold`` for a single-label one."""
    refused = ENGINES[engine].refusal(model, manifest)
    if refused:
        raise UsageError(refused)
    if threshold is not None and not manifest.multi_label:
        raise UsageError(
            f"--threshold {threshold:g}: {model} is a single-label model "
            "(one class per image); a threshold applies to multi-label models only"
        )
