"""The code blocks of the Markdown docs, and how the suite runs each kind.

A page's fenced blocks are read in order. ``sh``/``bash`` blocks that hold
only ``beamvision`` commands run in this process through
``beamvision.pipelines.cli.main`` (no TensorFlow start-up per command) and
must exit 0, or the status a ``# exit status N`` comment on the command
names; a command with ``--runner DataflowRunner`` gets ``--dry_run``
appended, as Dataflow cannot be reached from here. Other shell blocks run in
bash. ``python`` blocks run with ``exec``, in one namespace per page.
``sql`` blocks run in DuckDB and must return at least one row. ``text``
blocks (and fences without a language) are what the reader is shown, such
as outputs, and are not run.

A block directly after an ``<!-- not run: REASON -->`` comment (invisible
on the rendered page) is not run; ``tests/test_docs.py`` lists those blocks
and their reasons, so each one is a decision someone made.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import pathlib
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator

RUN = ("sh", "bash", "python", "sql")
SHOWN = ("text", "")  # a fence without a language is shown as it is, like text
_FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
_NOT_RUN = re.compile(r"^\s*<!--\s*not run:\s*(.+?)\s*-->\s*$")
_STATUS = re.compile(r"#.*\bexit status (\d+)")
_SINGLE_QUOTED = re.compile(r"'[^']*'")
_DOUBLE_QUOTED = re.compile(r'"[^"]*"')


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced block of a page: where it starts, its language, its code, why it is not run."""

    page: str
    line: int
    lang: str
    code: str
    not_run: str | None = None

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def read_blocks(path: pathlib.Path, name: str) -> list[Block]:
    """The fenced blocks of the Markdown file ``path`` (shown as ``name``), in order."""
    lines = path.read_text().splitlines()
    found, index = [], 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        if opening[1]:
            raise ValueError(
                f"{name}:{index + 1}: an indented ``` fence (in a list?) renders as inline code on the "
                "site: start it at the left margin"
            )
        lang = opening[2]
        end = index + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end == len(lines):
            raise ValueError(f"{name}:{index + 1}: a ``` block that is never closed")
        reason = _NOT_RUN.match(lines[index - 1]) if index else None
        code = "\n".join(lines[index + 1 : end]) + "\n"
        found.append(Block(name, index + 1, lang, code, reason[1] if reason else None))
        index = end + 1
    return found


def beamvision_commands(code: str) -> list[tuple[list[str], int]] | None:
    """The block as (argv after ``beamvision``, expected status) pairs, or None if it needs a shell."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if words[0] != "beamvision" or _needs_a_shell(line):
            return None
        status = _STATUS.search(line)
        commands.append((words[1:], int(status[1]) if status else 0))
    return commands or None


def _needs_a_shell(line: str) -> bool:
    """Whether bash would do more with ``line`` than split it: pipes, redirection, $, unquoted globs."""
    unquoted = _SINGLE_QUOTED.sub("", line)
    unquoted = re.split(r"\s#", unquoted, maxsplit=1)[0]
    if re.search(r"[|&;<>$`]", unquoted):
        return True
    return bool(re.search(r"[*?\[]", _DOUBLE_QUOTED.sub("", unquoted)))


def _for_this_machine(argv: list[str]) -> list[str]:
    """A Dataflow command as a dry run: it builds the job graph and submits nothing."""
    joined = " ".join(argv)
    if "--runner DataflowRunner" in joined or "--runner=DataflowRunner" in joined:
        return [*argv, "--dry_run"]
    return argv


@contextlib.contextmanager
def captured() -> Iterator[io.TextIOWrapper]:
    """Sends stdout and stderr to one real text stream (``cli.main`` reconfigures stdout)."""
    stream = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True)
    with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
        yield stream


def text_of(stream: io.TextIOWrapper) -> str:
    stream.flush()
    return stream.buffer.getvalue().decode("utf-8", "replace")


def run_block(block: Block, workspace: pathlib.Path, namespace: dict, path_first: list[str]) -> str:
    """Runs ``block`` in ``workspace``; returns what it printed; raises AssertionError if it failed."""
    with contextlib.chdir(workspace):
        if block.lang == "python":
            return _run_python(block, namespace)
        if block.lang == "sql":
            return _run_sql(block)
        commands = beamvision_commands(block.code)
        if commands is not None:
            return _run_commands(block, commands)
        return _run_shell(block, workspace, path_first)


def _run_commands(block: Block, commands: list[tuple[list[str], int]]) -> str:
    from beamvision.pipelines import cli

    printed = []
    for argv, expected in commands:
        dry_run = _for_this_machine(argv) != argv
        argv = _for_this_machine(argv)
        with captured() as stream:
            try:
                status = cli.main(argv)
            except SystemExit as stop:  # argparse's own --help and usage errors
                status = stop.code if isinstance(stop.code, int) else 1
        printed.append(text_of(stream))
        command, tail = f"beamvision {shlex.join(argv)}", printed[-1][-4000:]
        assert status == expected, f"{block.where}: `{command}` exited {status}, not {expected}:\n{tail}"
        if dry_run:
            assert "dry run: built the DataflowRunner job graph" in printed[-1], f"{block.where}: {tail}"
    return "".join(printed)


def _run_shell(block: Block, workspace: pathlib.Path, path_first: list[str]) -> str:
    env = {**os.environ, "PATH": os.pathsep.join([*path_first, os.environ.get("PATH", "")])}
    ran = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.code],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    printed = ran.stdout + ran.stderr
    assert ran.returncode == 0, f"{block.where}: the shell block exited {ran.returncode}:\n{printed[-4000:]}"
    return printed


def _run_python(block: Block, namespace: dict) -> str:
    with captured() as stream:
        try:
            exec(compile(block.code, block.where, "exec"), namespace)
        except Exception as exc:
            printed = text_of(stream)
            raise AssertionError(f"{block.where}: the Python block raised {exc!r}:\n{printed}") from exc
    return text_of(stream)


def _run_sql(block: Block) -> str:
    import duckdb

    rows = duckdb.connect().execute(block.code).fetchall()
    assert rows, f"{block.where}: the SQL block returned no rows"
    return "\n".join(map(str, rows))


def python_bin() -> str:
    """The folder of this interpreter's scripts (the venv's bin, where ``beamvision`` is)."""
    return os.path.dirname(sys.executable)
