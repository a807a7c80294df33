"""``python -m beamvision.stderr_filter``: stdin to stdout, minus TensorFlow's, absl's and gRPC's C++ noise.

The ``beamvision`` console script points its file descriptor 2, which Beam's
worker processes inherit, at this process (``beamvision.console.quiet_stderr``).
No log level silences the lines TensorFlow 2.21 prints from C++ while
``import tensorflow`` runs (absl's "before absl::InitializeLog()" notice, the
oneDNN and CUDA notes), so they are dropped here, line by line. Everything
else is copied as it arrives, a partial line (a prompt) after a short wait.

This is a process, not a thread: C++ code that writes to stderr while holding
Python's GIL cannot block it, and it outlives a crash of the command: it
survives the signals sent to the command's process group and ends when the
last writer closes the pipe, so nothing written before a failure is lost.
After a terminal's Ctrl-C (SIGINT) or a SIGTERM to the whole group, which
Beam's worker processes get too, only beamvision's own lines pass: the
command's one line on what it kept, not each worker's traceback of its
interrupt. It imports nothing of beamvision's.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal

_LOG_LINE = rb"\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [\w./+-]+:\d+\] "  # absl/glog: date, time, thread, file:line]
NOISE = (
    re.compile(
        rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR\s*$"
    ),
    # INFO and WARNING lines from C++, e.g.
    # "I0000 00:00:1796170445.825179   10943 port.cc:153] oneDNN custom operations are on. ..."
    re.compile(rb"[IW]" + _LOG_LINE),
    # ERROR lines only of the GPU probe on a machine without one; other errors, and FATAL, are kept.
    re.compile(rb"E" + _LOG_LINE + rb".*(cuInit|CUDA|cuDNN|cuFFT|cuBLAS|TensorRT)"),
    # LiteRT's interpreter and the TFLite converter (convert --format tflite) print these from C++.
    re.compile(rb"INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.\s*$"),
    re.compile(
        rb"fully_quantize: \d+, inference_type: \d+, input_inference_type: \w+, "
        rb"output_inference_type: \w+\s*$"
    ),
)
PARTIAL_LINE_WAIT_SECONDS = 0.2
OWN_LINE = b"beamvision "  # how the command's own messages begin (what an interrupted group still shows)
_interrupted = False


def _on_group_signal(_signum, _frame) -> None:
    global _interrupted
    _interrupted = True


def _kept(line: bytes) -> bool:
    return not is_noise(line) and (not _interrupted or line.startswith(OWN_LINE))


def is_noise(line: bytes) -> bool:
    """Whether one line (without its newline) is start-up noise that a quiet run drops."""
    return any(pattern.match(line) for pattern in NOISE)


def copy(source: int, target: int) -> None:
    """Copies ``source`` to ``target`` until end of file, dropping noise lines."""
    pending = b""
    while True:
        ready, _, _ = select.select([source], [], [], PARTIAL_LINE_WAIT_SECONDS if pending else None)
        if not ready:  # a line without its end waited long enough: it is shown as it is
            _write(target, pending)
            pending = b""
            continue
        chunk = os.read(source, 65536)
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        _write(target, b"".join(line + b"\n" for line in lines if _kept(line)))
    if _kept(pending):
        _write(target, pending)


def _write(target: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(target, view) :]


def main() -> None:
    # A signal to the process group (Ctrl-C, a timeout, a closed terminal) stops the command;
    # this ends when the command's last output is through, at the end of its input.
    for name in ("SIGHUP", "SIGQUIT"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    for name in ("SIGINT", "SIGTERM"):  # the command handles these; its workers print tracebacks
        signal.signal(getattr(signal, name), _on_group_signal)
    with contextlib.suppress(BrokenPipeError, KeyboardInterrupt):
        copy(0, 1)


if __name__ == "__main__":
    main()
