"""classify --incremental: nightly runs into one root, each classifying only what is new or changed."""

from __future__ import annotations

import glob
import io
import json
import os

import pandas as pd
import pyarrow.dataset as ds
import pytest
from PIL import Image, ImageOps

from beamvision import storage
from beamvision.pipelines.cli import main


def _jpeg(photo, variant: int = 0) -> bytes:
    image = Image.fromarray(photo)
    if variant:
        image = ImageOps.mirror(image).rotate(variant)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def _run(root: str, images: str, model: str, run_id: str, capsys) -> dict:
    argv = ["classify", "--input", images, "--model", model, "--output", root, "--incremental"]
    argv += ["--max_error_rate", "1"]  # a night's few files, some broken on purpose
    assert main([*argv, "--run_id", run_id]) == 0
    out = capsys.readouterr().out
    summary = json.loads(storage.read_text(storage.join(root, f"run={run_id}", "summary.json")))
    assert summary["complete"] is True, summary
    assert f"classified {summary['results']:,} of {summary['inputs']:,} images" in out
    return summary


def _write(uri: str, data: bytes) -> None:
    storage.write_atomic(uri, data)


def _counts(summary: dict) -> tuple[int, int, int]:
    return summary["results"], summary["errors"], summary["skipped"]


@pytest.mark.slow
def test_nightly_runs_classify_only_what_is_new_or_changed(nightly_models, photos, tmp_path, capsys):
    images, root = str(tmp_path / "bucket"), str(tmp_path / "catalog")
    names = [f"photo_{i}.jpg" for i in range(6)]
    for i, name in enumerate(names):
        _write(os.path.join(images, name), _jpeg(photos[i % len(photos)]))
    _write(os.path.join(images, "broken.jpg"), b"not a jpeg")

    assert _counts(_run(root, images, nightly_models["1"], "r1", capsys)) == (6, 1, 0)
    # Nothing changed: the decode failure is not retried either.
    assert _counts(_run(root, images, nightly_models["1"], "r2", capsys)) == (0, 0, 7)

    for i in range(5):  # five new files, two rewritten (new bytes, new size and time)
        _write(os.path.join(images, f"new_{i}.jpg"), _jpeg(photos[i % len(photos)], variant=i + 1))
    for name in names[:2]:
        _write(os.path.join(images, name), _jpeg(photos[0], variant=30))
    assert _counts(_run(root, images, nightly_models["1"], "r3", capsys)) == (7, 0, 5)

    # A run that died before its summary is ignored: its files are classified again.
    _write(os.path.join(images, "late.jpg"), _jpeg(photos[1], variant=7))
    assert _counts(_run(root, images, nightly_models["1"], "r4", capsys)) == (1, 0, 12)
    os.remove(os.path.join(root, "run=r4", "summary.json"))
    assert _counts(_run(root, images, nightly_models["1"], "r5", capsys)) == (1, 0, 12)

    # A new model version classifies everything.
    assert _counts(_run(root, images, nightly_models["2"], "r6", capsys)) == (12, 1, 0)

    # One table: the latest label of every image, over every run (pandas / pyarrow).
    shards = sorted(glob.glob(os.path.join(root, "run=*", "results-*.parquet")))
    results = ds.dataset(shards, format="parquet", partitioning="hive", partition_base_dir=root)
    table = results.to_table(filter=ds.field("model_version") == "2")
    latest = table.to_pandas().sort_values("processed_at").groupby("image_uri").tail(1)
    assert len(latest) == 12 and set(latest.run) == {"r6"}

    import duckdb

    query = f"""
        SELECT image_uri, arg_max(label, processed_at) AS label, arg_max(run, processed_at) AS run
        FROM read_parquet('{root}/run=*/results-*.parquet', hive_partitioning = true)
        GROUP BY image_uri ORDER BY image_uri
    """
    rows = duckdb.sql(query).df()
    assert len(rows) == 12  # every image that was ever classified, once
    assert rows.run.eq("r6").all()  # version 2 classified them all last
    first = pd.concat(pd.read_parquet(f) for f in glob.glob(os.path.join(root, "run=r1", "results-*")))
    assert set(first.image_uri) < set(rows.image_uri)


def test_incremental_runs_on_gcs(nightly_models, photos, gcs_bucket, capsys):
    images, root = f"{gcs_bucket}/photos", f"{gcs_bucket}/catalog"
    for i in range(3):
        _write(f"{images}/p{i}.jpg", _jpeg(photos[i]))
    assert _counts(_run(root, images, nightly_models["1"], "n1", capsys)) == (3, 0, 0)
    _write(f"{images}/p3.jpg", _jpeg(photos[3]))
    _write(f"{images}/p0.jpg", _jpeg(photos[0], variant=5))  # a new generation
    assert _counts(_run(root, images, nightly_models["1"], "n2", capsys)) == (2, 0, 2)


def test_run_id_needs_incremental_and_a_safe_name(nightly_models, tmp_path, capsys):
    argv = [
        "classify",
        "--input",
        str(tmp_path),
        "--model",
        nightly_models["1"],
        "--output",
        str(tmp_path / "o"),
    ]
    assert main([*argv, "--run_id", "x"]) == 2
    assert "--run_id x: only with --incremental" in capsys.readouterr().err
    assert main([*argv, "--incremental", "--run_id", "../x"]) == 2
    assert "argument --run_id: expected letters, digits" in capsys.readouterr().err


def test_an_inventory_lists_the_inputs(nightly_models, photos, tmp_path, capsys):
    """--input_list as a CSV or Parquet inventory: the URI column named by --input_list_column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = []
    for i in range(3):
        path = tmp_path / f"p{i}.jpg"
        path.write_bytes(_jpeg(photos[i]))
        paths.append(str(path))
    (tmp_path / "inventory.csv").write_text(
        "bucket,name,size\n" + "".join(f"b,{p},{os.path.getsize(p)}\n" for p in paths[:2])
    )
    pq.write_table(pa.table({"object": paths, "size": [1, 2, 3]}), tmp_path / "inventory.parquet")
    for inventory, column, count in (("inventory.csv", "name", 2), ("inventory.parquet", "object", 3)):
        output = str(tmp_path / f"out-{column}")
        argv = ["classify", "--input_list", str(tmp_path / inventory), "--input_list_column", column]
        assert main([*argv, "--model", nightly_models["1"], "--output", output]) == 0
        assert f"classified {count} of {count} images" in capsys.readouterr().out
    argv = ["classify", "--input_list", str(tmp_path / "inventory.csv"), "--model", nightly_models["1"]]
    assert main([*argv, "--output", str(tmp_path / "o"), "--input_list_column", "uri"]) == 2
    assert "--input_list " in capsys.readouterr().err
    assert main([*argv, "--output", str(tmp_path / "o")]) == 2  # default column: uri
    assert "its header has no column 'uri' (columns: bucket, name, size)" in capsys.readouterr().err


def test_only_errors_the_same_bytes_always_give_are_final():
    from beamvision.transforms.incremental import is_final_error

    final = [("decode", t) for t in ("EmptyFile", "NotAnImage", "UnsupportedFormat", "CorruptImage")]
    retried = [("decode", "DecompressionBomb"), ("decode", "OutOfMemory"), ("read", "FileNotFoundError")]
    assert all(is_final_error({"stage": s, "error_type": t}) for s, t in final)
    assert not any(is_final_error({"stage": s, "error_type": t}) for s, t in [*retried, ("inference", "X")])
    assert not is_final_error({})  # a row of a run without these columns


def test_a_file_version_survives_the_trip_through_parquet(tmp_path):
    """The file's float mtime and the row's timestamp compare equal, half microseconds included."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from beamvision.transforms.incremental import file_version
    from beamvision.transforms.rows import FILE_FIELDS, file_identity

    times = [1795870942.6445965, 1795870942.6371675, 1.5e9 + 0.0000005, 1.7e9]
    rows = [file_identity(100, t) for t in times]
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(FILE_FIELDS)), tmp_path / "t.parquet")
    back = pq.read_table(tmp_path / "t.parquet").to_pylist()
    assert [file_version(r["file_size"], r["file_modified"]) for r in back] == [
        file_version(100, t) for t in times
    ]
    assert file_version(None, times[0]) is None and file_version(100, None) is None
