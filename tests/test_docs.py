"""The docs cannot drift: every command and snippet they show runs, the flag reference is the parsers'.

Each page (README.md, docs/*.md) runs its ``sh``, ``bash``, ``python`` and
``sql`` blocks in order (``docs_blocks`` says how each kind runs) in its own
folder of small real data (``docs_workspace``), with ``gs://my-bucket`` on the
GCS emulator. The Training page runs first, once per session, and the pages
after it classify with the model it trained. The site is built with
``mkdocs build --strict``, so a broken link or a page missing from the nav
fails, and docs/reference.md must be what ``make docs-reference`` writes.
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import docs_reference
import docs_workspace
import pytest
from conftest import built_once
from docs_blocks import RUN, SHOWN, python_bin, read_blocks, run_block

REPO = pathlib.Path(__file__).resolve().parent.parent
PAGES = ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))]
TRAINING = "docs/training.md"
BUILT_BY_TRAINING = ("data", "models")
IN_THE_BUCKET = ("photos", "incoming", "data/photos", "models/photos")
# Blocks that are shown but not run, per page; each carries its reason in the page.
NOT_RUN = {
    "README.md": 1,
    "docs/getting-started.md": 2,
    "docs/labelling.md": 1,
    "docs/performance.md": 1,
    "docs/runners.md": 2,
    "docs/training.md": 1,
}
# Session fixtures a page needs beyond its folder and the bucket.
PAGE_FIXTURES = {"docs/getting-started.md": ("imagenet_mobilenet_v2",)}
STAND_IN = '''#!{python}
"""Stand-in for {name}: Google Cloud cannot be reached from the tests; checks the files it names."""
import os
import sys

named = [a.split("=", 1)[-1] for a in sys.argv[1:]]
missing = [a for a in named if a.startswith("deploy/") and not os.path.exists(a)]
if missing:
    sys.exit(f"{name}: no such file: {{missing}}")
print("{name} (stand-in, not run):", *sys.argv[1:])
'''


def _blocks(page: str):
    return read_blocks(REPO / page, page)


def _runnable(page: str):
    return [b for b in _blocks(page) if b.lang in RUN and b.not_run is None]


@pytest.fixture(scope="session")
def stand_ins(tmp_path_factory) -> str:
    """A folder of ``gcloud`` and ``docker`` stand-ins, first on the shell blocks' PATH."""
    folder = tmp_path_factory.mktemp("stand-ins")
    for name in ("gcloud", "docker"):
        script = folder / name
        script.write_text(STAND_IN.format(python=sys.executable, name=name))
        script.chmod(0o755)
    return str(folder)


def _run_page(page: str, workspace: pathlib.Path, stand_ins: str) -> int:
    """Runs every runnable block of ``page`` in ``workspace``; returns how many ran."""
    namespace = {"__name__": "__main__"}
    blocks = _runnable(page)
    for block in blocks:
        run_block(block, workspace, namespace, [python_bin(), stand_ins])
    return len(blocks)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, stand_ins) -> pathlib.Path:
    """The Training page's folder, after its blocks ran (once per session, whatever the xdist workers)."""

    def build(folder: str) -> None:
        workspace = pathlib.Path(folder)
        docs_workspace.fill(workspace)
        ran = _run_page(TRAINING, workspace, stand_ins)
        (workspace / ".blocks-ran").write_text(str(ran))

    return pathlib.Path(built_once(tmp_path_factory, "docs-training", build))


@pytest.fixture(scope="session")
def bucket(gcs_emulator, trained, tmp_path_factory) -> str:
    """``gs://my-bucket`` on this process's emulator: the photos, the new images, the data, the model."""
    docs_workspace.upload(trained, IN_THE_BUCKET)
    return f"gs://{docs_workspace.BUCKET}"


@pytest.mark.slow
@pytest.mark.parametrize("page", [page for page in PAGES if _runnable(page)])
def test_every_block_of_the_page_runs(page, request, tmp_path, stand_ins):
    trained = request.getfixturevalue("trained")
    if page == TRAINING:
        assert int((trained / ".blocks-ran").read_text()) == len(_runnable(page))
        return
    for name in ("bucket", *PAGE_FIXTURES.get(page, ())):
        request.getfixturevalue(name)
    docs_workspace.fill(tmp_path)
    docs_workspace.copy_built(trained, tmp_path, BUILT_BY_TRAINING)
    _run_page(page, tmp_path, stand_ins)


@pytest.mark.parametrize("page", PAGES)
def test_every_block_is_run_or_shown(page):
    blocks = _blocks(page)
    unknown = [f"{b.where} ```{b.lang}" for b in blocks if b.lang not in RUN + SHOWN]
    assert not unknown, f"blocks neither run ({', '.join(RUN)}) nor shown (text): {unknown}"
    not_run = [b for b in blocks if b.not_run is not None]
    assert all(b.lang in RUN for b in not_run), "a not-run comment stands before a block that is not code"
    assert len(not_run) == NOT_RUN.get(page, 0), [f"{b.where}: {b.not_run}" for b in not_run]


def test_the_sql_over_a_catalog_names_a_model_version_train_writes():
    """The nightly runs' query must select rows that exist: the README's once matched no version."""
    sql = [b.code for b in _blocks("docs/scheduled-runs.md") if b.lang == "sql"]
    assert sql and not any(re.search(r"model_version\s*=\s*'\d+'", code) for code in sql)


def test_the_reference_is_generated_from_the_parsers():
    expected = docs_reference.build()
    assert (REPO / "docs" / "reference.md").read_text() == expected, (
        "docs/reference.md differs from the commands' --help: run make docs-reference"
    )


def test_the_site_builds_strictly(tmp_path):
    ran = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert (tmp_path / "site" / "reference" / "index.html").exists()


def test_the_nav_lists_every_page():
    import yaml

    with open(REPO / "mkdocs.yml") as f:
        nav = json.dumps(yaml.safe_load(f)["nav"])
    missing = [p for p in PAGES if p.startswith("docs/") and f'"{p.removeprefix("docs/")}"' not in nav]
    assert not missing, f"pages missing from mkdocs.yml's nav: {missing}"


def test_the_readmes_links_resolve():
    text = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    relative = [link.split("#")[0] for link in links if not re.match(r"[a-z]+:|#", link)]
    assert relative, "the README links into docs/"
    broken = [link for link in relative if not (REPO / link).exists()]
    assert not broken, f"README.md links to files that do not exist: {broken}"
