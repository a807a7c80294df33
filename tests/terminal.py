"""What a run prints on stderr: the start-up noise none may show, and its plain progress lines."""

from __future__ import annotations

import re

# Quoted from runs before the quiet start: TensorFlow's C++ (twice per process), Beam's root logger.
STARTUP_NOISE = (
    "All log messages before absl::InitializeLog() is called",
    "oneDNN custom operations are on",
    "Could not find cuda drivers",
    "Resource module is not available",
    "No semi_persistent_directory found",
    "Discarding unparseable args",
)
PROGRESS_LINE = re.compile(
    r"^(?P<command>\w+): (?P<done>[\d,]+)(?:/(?P<total>[\d,]+))? images (?:\((?P<percent>\d+)%\) )?"
    r"\[[\d:]+(?:<[\d:?]+)?, (?P<rate>[\d.]+|\?) images/s, (?P<errors>[\d,]+) errors?(?:, [\d,]+ skipped)?\]$"
)


def assert_no_startup_noise(stderr: str) -> None:
    shown = [noise for noise in STARTUP_NOISE if noise in stderr]
    assert not shown, stderr[-3000:]


def progress_lines(stderr: str, command: str) -> list[dict]:
    """The plain progress lines of ``command`` in ``stderr``, as numbers (None where not yet known)."""
    lines = []
    for line in stderr.splitlines():
        match = PROGRESS_LINE.match(line)
        if match and match["command"] == command:
            lines.append(
                {
                    "done": int(match["done"].replace(",", "")),
                    "total": int(match["total"].replace(",", "")) if match["total"] else None,
                    "rate": None if match["rate"] == "?" else float(match["rate"]),
                    "errors": int(match["errors"].replace(",", "")),
                }
            )
    return lines
