"""The distribution: one ``beamvision`` import package, built and installed the ways users install it.

- ``--setup_file`` on Dataflow: Beam's own stager builds the sdist that workers install.
- The Docker image: ``pip install .`` from exactly the files deploy/Dockerfile copies.
- Either way, only ``beamvision`` and its dist-info land in site-packages, and a
  user's own ``models``/``pipelines``/``transforms`` packages on the Python path
  do not shadow ours: every command still runs.
- The layers import downwards only: models <- transforms <- pipelines; and module by
  module, no command imports another command, models imports no Beam.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest
from conftest import built_once
from digits import render_subset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(REPO, "src", "beamvision", "__init__.py")) as _f:
    VERSION = re.search(r'__version__ = "(.+)"', _f.read())[1]

# Layer -> its rank (higher may import lower, never the reverse); "root" is the package root.
LAYERS = {"root": 0, "models": 1, "transforms": 2, "pipelines": 3}


def _docker_context(target: str) -> str:
    """A copy of the files deploy/Dockerfile COPYs into its WORKDIR (the build context it installs)."""
    with open(os.path.join(REPO, "deploy", "Dockerfile")) as f:
        copies = [line.split()[1:] for line in f if line.startswith("COPY ") and "--from" not in line]
    for *sources, destination in copies:
        for source in sources:
            to = os.path.join(target, destination if len(sources) == 1 else os.path.join(destination, source))
            if os.path.isdir(os.path.join(REPO, source)):
                shutil.copytree(
                    os.path.join(REPO, source), to, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
                )
            else:
                os.makedirs(os.path.dirname(to.rstrip("/")) or target, exist_ok=True)
                shutil.copy(os.path.join(REPO, source), to)
    return target


def _fresh_venv(path: str) -> tuple[str, str]:
    """An empty virtual environment; returns (its python, its site-packages)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", path], check=True)
    python = os.path.join(path, "bin", "python")
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return python, purelib


def _pip(command: str, *args: str, python: str = sys.executable) -> None:
    """Runs this environment's pip offline, on local files only, for the environment of ``python``."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            python,
            command,
            "--quiet",
            "--no-deps",
            "--no-index",
            *args,
        ],
        check=True,
        capture_output=True,
    )


@dataclasses.dataclass(frozen=True)
class Install:
    python: str  # the venv's interpreter
    site: str  # its site-packages
    installed: list[str]  # what the install put into site-packages


def _install(source: str, venv: str, wheels: str) -> Install:
    """Builds a wheel from ``source`` (an sdist or a source tree); installs it alone into a new venv.

    The build runs here, with this environment's setuptools (no download); the
    install, as on a worker or in the image, puts only what the wheel holds.
    Then a .pth file lends the venv this environment's packages (TensorFlow,
    Beam, ...), which the install itself leaves out.
    """
    _pip("wheel", "--no-build-isolation", "--wheel-dir", wheels, source)
    (wheel,) = [os.path.join(wheels, n) for n in os.listdir(wheels) if n.endswith(".whl")]
    python, site = _fresh_venv(venv)
    _pip("install", wheel, python=python)
    installed = sorted(os.listdir(site))
    with open(os.path.join(site, "dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    return Install(python, site, installed)


@pytest.fixture(scope="module")
def installs(tmp_path_factory):
    """beamvision in two fresh venvs: from Beam's --setup_file sdist, and as the Dockerfile installs it.

    Built once for all xdist workers (``built_once``): tests only run what is installed.
    """

    def build(work):
        from apache_beam.options.pipeline_options import PipelineOptions
        from apache_beam.runners.portability.stager import Stager

        context = _docker_context(str(work / "context"))
        staging = str(work / "staging")
        os.makedirs(staging)
        Stager.create_job_resources(
            PipelineOptions(["--setup_file", os.path.join(context, "setup.py")]),
            staging,
            log_submission_env_dependencies=False,
        )
        sdists = [name for name in os.listdir(staging) if name.endswith(".tar.gz")]
        assert len(sdists) == 1, os.listdir(staging)
        installs = {
            name: dataclasses.asdict(_install(source, str(work / name), str(work / f"{name}-wheel")))
            for name, source in [("setup_file", os.path.join(staging, sdists[0])), ("docker", context)]
        }
        (work / "installs.json").write_text(json.dumps(installs))

    work = built_once(tmp_path_factory, "packaging", build)
    with open(os.path.join(work, "installs.json")) as f:
        installs = {name: Install(**fields) for name, fields in json.load(f).items()}
    return installs, os.path.join(work, "context")


@pytest.mark.parametrize("how", ["setup_file", "docker"])
def test_only_beamvision_lands_in_site_packages(installs, how):
    install = installs[0][how]
    assert install.installed == ["beamvision", f"beamvision-{VERSION}.dist-info"]
    package = os.path.join(install.site, "beamvision")
    expected = {"models", "transforms", "pipelines", "storage.py", "__init__.py", "__main__.py"}
    assert expected <= set(os.listdir(package))
    assert os.path.isfile(os.path.join(package, "models", "labels", "imagenet.txt"))
    assert os.path.isfile(os.path.join(package, "pipelines", "templates", "review.html"))  # beamvision review
    with open(os.path.join(install.site, f"beamvision-{VERSION}.dist-info", "entry_points.txt")) as f:
        assert "beamvision = beamvision.pipelines.cli:console_main" in f.read()
    assert os.path.isfile(os.path.join(os.path.dirname(install.python), "beamvision"))


@pytest.mark.slow
def test_the_image_runs_from_its_workdir(installs):
    """In the image, Beam's worker and ``python -m beamvision`` start in the WORKDIR beside the sources.

    The current directory comes first on sys.path there; the installed package
    must still be the one imported, with every subpackage.
    """
    docker, context = installs[0]["docker"], installs[1]
    listed = subprocess.run(
        [docker.python, "-m", "beamvision", "models"],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "mobilenet_v2" in listed.stdout
    where = subprocess.run(
        [docker.python, "-c", "import beamvision.transforms.inference as m; print(m.__file__)"],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert where.returncode == 0, where.stderr[-2000:]
    assert where.stdout.strip().startswith(docker.site)


_USERS_OWN_CODE = {
    "models/__init__.py": '"""A user\'s own package, unrelated to beamvision."""\nUSERS_OWN = "models"\n',
    "pipelines/__init__.py": 'USERS_OWN = "pipelines"\n',
    "transforms/__init__.py": 'USERS_OWN = "transforms"\n',
}

# Every command, in one process, with the user's packages first on the path.
_EVERY_COMMAND = textwrap.dedent(
    """
    import sys

    import models, pipelines, transforms  # the user's own, imported first
    from beamvision.pipelines.cli import main

    root, work = sys.argv[1:]
    commands = [
        ["export", "--architecture", "squeezenet", "--weights", "none", "--num_classes", "3",
         "--input_size", "32", "--output", f"{work}/exported"],
        ["prepare", "--input", root, "--output", f"{work}/data", "--image_size", "32"],
        ["train", "--data", f"{work}/data", "--architecture", "squeezenet", "--output", f"{work}/model",
         "--epochs", "1", "--steps_per_epoch", "1", "--batch_size", "8"],
        ["classify", "--input", root, "--model", f"{work}/model", "--output", f"{work}/results"],
        ["evaluate", "--results", f"{work}/results", "--truth", "folders"],
    ]
    for argv in commands:
        assert main(argv) == 0, argv
    # The demo (minutes) is prepare, train, classify and evaluate, run above; here, its flags.
    try:
        main(["demo", "--help"])
    except SystemExit as exc:
        assert exc.code == 0
    assert (models.USERS_OWN, pipelines.USERS_OWN, transforms.USERS_OWN) == (
        "models", "pipelines", "transforms")
    print("every command ran")
    """
)


@pytest.mark.slow
def test_a_users_own_models_package_does_not_shadow_beamvision(installs, tmp_path):
    python = installs[0]["setup_file"].python
    users = tmp_path / "project"
    for relative, text in _USERS_OWN_CODE.items():
        (users / relative).parent.mkdir(parents=True, exist_ok=True)
        (users / relative).write_text(text)
    env = {**os.environ, "PYTHONPATH": str(users)}
    beamvision = os.path.join(os.path.dirname(python), "beamvision")

    listed = subprocess.run(
        [beamvision, "models"], cwd=users, env=env, capture_output=True, text=True, timeout=300
    )
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert listed.stdout.splitlines()[0].split()[:2] == ["name", "input_size"]
    assert "mobilenet_v2" in listed.stdout
    root = render_subset(str(tmp_path / "digits"), classes=3, per_class=8)
    script = tmp_path / "every_command.py"
    script.write_text(_EVERY_COMMAND)
    ran = subprocess.run(
        [python, str(script), root, str(tmp_path / "work")],
        cwd=users,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert "every command ran" in ran.stdout
    assert "usage: beamvision demo" in ran.stdout
    assert "classified 24 of 24 images" in ran.stdout


def _imported_names(path: str) -> list[tuple[str, str]]:
    """Every name a source file imports, at any depth (lazy imports too), with the statement that does.

    ``from a.b import c`` gives ``a.b`` and ``a.b.c`` (``c`` may be a module),
    each with ``LINE: from a.b import c``.
    """
    with open(path) as f:
        tree = ast.parse(f.read())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(f"{node.lineno}: {ast.unparse(node)}", name) for name in names]
    return found


def _beamvision_imports(path: str) -> set[str]:
    """The beamvision subpackages (or root modules) that a source file imports."""
    found = set()
    for _, name in _imported_names(path):
        parts = name.split(".")
        if parts[0] in ("models", "pipelines", "transforms"):
            found.add(f"bare {parts[0]}")
        elif parts[0] == "beamvision" and len(parts) > 1:
            found.add(parts[1] if parts[1] in LAYERS else "root")
    return found


def import_graph() -> dict[str, set[str]]:
    """Layer -> the layers its modules import from (``root`` is the package root, src/beamvision/)."""
    graph = {}
    for layer in LAYERS:
        folder = os.path.join(REPO, "src", "beamvision") if layer == "root" else os.path.join(REPO, layer)
        imported = set()
        for name in os.listdir(folder):
            if name.endswith(".py") and name != "__main__.py":  # __main__ is an entry point
                imported |= _beamvision_imports(os.path.join(folder, name))
        graph[layer] = imported - {layer}
    return graph


def test_layers_import_downwards_only():
    graph = import_graph()
    for folder, imported in graph.items():
        assert not any(name.startswith("bare ") for name in imported), (folder, imported)
        upward = {name for name in imported if LAYERS[name] > LAYERS[folder]}
        assert not upward, f"{folder} imports {upward}"
    assert graph == {
        "root": set(),
        "models": {"root"},
        "transforms": {"root", "models"},
        "pipelines": {"root", "models", "transforms"},
    }


def _modules() -> dict[str, str]:
    """Every beamvision module (``beamvision.pipelines.train``) -> its source file, subpackages included."""
    modules = {}
    for layer in LAYERS:
        package = "beamvision" if layer == "root" else f"beamvision.{layer}"
        folder = os.path.join(REPO, "src", "beamvision") if layer == "root" else os.path.join(REPO, layer)
        for directory, subfolders, names in os.walk(folder):
            subfolders[:] = [d for d in subfolders if d != "__pycache__"]
            relative = os.path.relpath(directory, folder)
            inner = [] if relative == "." else relative.split(os.sep)
            for name in names:
                if name.endswith(".py"):
                    stem = [] if name == "__init__.py" else [name[:-3]]
                    modules[".".join([package, *inner, *stem])] = os.path.join(directory, name)
    return modules


def _offences(importers: set[str], forbidden) -> list[str]:
    """``module:LINE: import ...`` for each import by ``importers`` of a name ``forbidden(module, name)``."""
    modules = _modules()
    found = {
        (module, int(statement.split(":")[0]), statement)
        for module in importers
        for statement, name in _imported_names(modules[module])
        if forbidden(module, name)
    }
    return [f"{module}:{statement}" for module, _, statement in sorted(found)]


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(f"{package}.")


def test_no_command_module_imports_another():
    """Each command stands alone; what two commands share lives beside them, not in one of them.

    (The demo, which runs the others end to end, calls them through the CLI.)
    """
    from beamvision.pipelines.cli import COMMANDS

    commands = {f"beamvision.pipelines.{module}" for module, _ in COMMANDS.values()}
    assert commands <= set(_modules()), commands - set(_modules())
    offences = _offences(commands, lambda module, name: any(_within(name, c) for c in commands - {module}))
    assert not offences, "a command module imports another:\n" + "\n".join(offences)


def test_models_import_neither_beam_nor_transforms_nor_pipelines():
    """The Keras side has no Beam: models is usable (and testable) without a pipeline."""
    models = {m for m in _modules() if _within(m, "beamvision.models")}
    upper = ("apache_beam", "beamvision.transforms", "beamvision.pipelines")
    offences = _offences(models, lambda _, name: any(_within(name, u) for u in upper))
    assert not offences, "beamvision.models imports Beam or a layer above it:\n" + "\n".join(offences)


def test_transforms_import_no_pipelines():
    transforms = {m for m in _modules() if _within(m, "beamvision.transforms")}
    offences = _offences(transforms, lambda _, name: _within(name, "beamvision.pipelines"))
    assert not offences, "beamvision.transforms imports a command-side module:\n" + "\n".join(offences)
