"""The small real data that the docs' commands name by relative path, and its copy in the bucket.

Every page runs in its own folder holding:

- ``photos/<class>/NNNN.jpg``: 42 crops of the 7 shipped photographs (6 a
  class, 64x48), the training set of the guide;
- ``incoming/<class>/NNNN.jpg``: 14 new crops (2 a class, another seed), the
  images the guide classifies; their folder names the truth;
- ``shards/incoming.tar``: the same 14 images packed in one archive;
- ``inventory.csv`` (a header ``uri`` and the 14 paths) and ``labels.csv``
  (``uri,label`` rows for them);
- ``deploy/``: the repository's, as in a checkout;

and ``gs://my-bucket`` on the GCS emulator holds ``photos/`` and ``incoming/``
too. What the Training page builds (``data/``, ``models/``) is copied into
the pages after it.
"""

from __future__ import annotations

import os
import pathlib
import shutil

from packing import pack_folder
from photos import write_photo_classes

BUCKET = "my-bucket"
REPO = pathlib.Path(__file__).resolve().parent.parent
SIZE = (64, 48)


def fill(folder: pathlib.Path) -> None:
    """Writes the local data every page's workspace starts with into ``folder``."""
    write_photo_classes(str(folder / "photos"), per_class=6, size=SIZE, seed=0)
    incoming = write_photo_classes(str(folder / "incoming"), per_class=2, size=SIZE, seed=1)
    os.makedirs(folder / "shards")
    pack_folder(str(folder / "shards" / "incoming.tar"), str(folder / "incoming"))
    paths = sorted(os.path.relpath(p, folder) for paths in incoming.values() for p in paths)
    (folder / "inventory.csv").write_text("uri\n" + "".join(f"{p}\n" for p in paths))
    (folder / "labels.csv").write_text("".join(f"{p},{p.split('/')[1]}\n" for p in paths))
    (folder / "deploy").symlink_to(REPO / "deploy")


def copy_built(source: pathlib.Path, folder: pathlib.Path, names: tuple[str, ...]) -> None:
    """Copies the folders ``names`` that another page built in ``source`` into ``folder``."""
    for name in names:
        if (source / name).exists():
            shutil.copytree(source / name, folder / name, symlinks=True)


def upload(folder: pathlib.Path, names: tuple[str, ...]) -> None:
    """Creates ``gs://my-bucket`` on the emulator and copies the folders ``names`` of ``folder`` into it."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    client = gcs.Client(project="beamvision-test", credentials=AnonymousCredentials())
    bucket = client.bucket(BUCKET)
    if not bucket.exists():
        bucket = client.create_bucket(BUCKET)
    for name in names:
        for path in sorted((folder / name).rglob("*")):
            if path.is_file():
                bucket.blob(path.relative_to(folder).as_posix()).upload_from_filename(str(path))
