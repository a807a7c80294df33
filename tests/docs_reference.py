"""Builds docs/reference.md, the flag reference, from the commands' own ``--help`` texts.

The reference is never typed: for each command in ``beamvision.pipelines.cli.COMMANDS``
it holds what ``beamvision <command> --help`` prints, with the terminal width
fixed (``COLUMNS=100``) so argparse wraps the same on every machine.
``make docs-reference`` (``python tests/docs_reference.py``) writes the file;
``tests/test_docs.py`` builds it in memory and fails when the file differs.
"""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import sys
from unittest import mock

REFERENCE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "reference.md"
COLUMNS = "100"

HEADER = """\
# Flag reference

Every command's flags, as `beamvision <command> --help` prints them. This page
is generated from the commands' parsers (`make docs-reference`); the test
suite fails when it differs from them.

`python -m beamvision ...` is the same as `beamvision ...`. Every command also
takes `--quiet` (no progress, only warnings, errors and the summary) and
`--verbose` (everything TensorFlow, absl and Beam log; see
[What a run prints](classify.md#what-a-run-prints)). A wrong flag or value
prints one line naming the flag and the value and exits with status 2. On/off
flags (`--embeddings`, `--overwrite`, `--freeze_base`, `--json`, Beam's
`--dry_run`) are on when given bare and also take a value: `--overwrite=false`,
`true`/`false` in any case, or `1`/`0`, as Flex Templates and schedulers pass
them. Commands that run a Beam pipeline also take Beam's own options
(`--runner`, `--direct_num_workers`, the Dataflow flags), which their help
does not list.
"""


def help_text(argv: list[str]) -> str:
    """What ``beamvision ARGV`` prints on stdout (``--help``), at the fixed terminal width."""
    from beamvision.pipelines import cli

    # A real text stream, not a StringIO: cli.main reconfigures stdout's buffering.
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    # NO_COLOR: Python 3.14's argparse would colour its help where FORCE_COLOR asks for it.
    fixed = {"COLUMNS": COLUMNS, "NO_COLOR": "1"}
    with mock.patch.dict(os.environ, fixed), contextlib.redirect_stdout(out):
        try:
            status = cli.main(argv)
        except SystemExit as stop:  # argparse's --help exits 0 after printing
            status = stop.code or 0
    if status != 0:
        raise RuntimeError(f"beamvision {' '.join(argv)} exited with status {status}")
    out.flush()
    return out.buffer.getvalue().decode("utf-8").rstrip() + "\n"


def build() -> str:
    """The text of docs/reference.md: the program's help, then one section per command."""
    from beamvision.pipelines import cli

    parts = [HEADER, "## beamvision\n", "```text\n" + help_text(["--help"]) + "```\n"]
    for name, (_, description) in cli.COMMANDS.items():
        parts.append(f"## beamvision {name}\n\n{description[0].upper()}{description[1:]}.\n")
        parts.append("```text\n" + help_text([name, "--help"]) + "```\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Writes docs/reference.md; returns 0."""
    del argv  # no flags: the file's place and content are fixed
    REFERENCE.write_text(build())
    print(f"wrote {REFERENCE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
