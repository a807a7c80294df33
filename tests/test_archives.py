"""Archives as input: members streamed from tar, tar.gz and zip of real photos, damage, hostile
archives (names that climb out, links, lying sizes, millions of members), and classify and
prepare over archives, local and on gs://."""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import tarfile
import tracemalloc
import zipfile

import pandas as pd
import pytest
from conftest import most_bytes_held
from packing import forged_size_header, link, pack, regular, tar_with, truncate
from photos import write_photo_classes

from beamvision import storage
from beamvision.models import create_model
from beamvision.models.artifact import new_manifest, save_artifact
from beamvision.pipelines import classify, prepare
from beamvision.transforms.members import (
    ArchiveBroken,
    Tally,
    is_image_name,
    iter_members,
    safe_member_name,
    split_member_uri,
)

KINDS = {"tar": "tar", "tar.gz": "tar", "zip": "zip"}


@pytest.fixture(scope="module")
def photo_members(tmp_path_factory):
    """Real photo crops by class, as archive members: {"<class>/<i>.jpg": bytes}."""
    root = str(tmp_path_factory.mktemp("photos"))
    write_photo_classes(root, per_class=3, size=(64, 48))
    members = {}
    for path in sorted(glob.glob(f"{root}/*/*.jpg")):
        with open(path, "rb") as f:
            members[os.path.relpath(path, root)] = f.read()
    return members


def _members(data: bytes, kind: str, **kwargs):
    return list(iter_members(io.BytesIO(data), kind, size=len(data), **kwargs))


@pytest.mark.parametrize("ext", list(KINDS))
def test_every_image_member_is_streamed_with_its_exact_bytes(ext, photo_members, tmp_path):
    side_files = {"README": b"about", "0001.json": b"{}", "0001.cls": b"3", "__MACOSX/cat/._0000.jpg": b"x"}
    path = pack(
        str(tmp_path / f"a.{ext}"), {**photo_members, **side_files, "./extra//coffee.png": b"\x89PNG"}
    )
    tally = Tally()
    with open(path, "rb") as f:
        members = list(iter_members(f, KINDS[ext], tally=tally))
    got = {m.name: m.data for m in members}
    assert got == {**photo_members, "extra/coffee.png": b"\x89PNG"}  # names normalised
    assert all(m.error is None and m.size == len(m.data) for m in members)
    assert (tally.members, tally.not_images) == (len(photo_members) + 1, 4)


@pytest.mark.parametrize("ext", list(KINDS))
def test_a_truncated_archive_yields_the_members_before_the_damage_and_says_where(ext, tmp_path):
    members = {f"c/{i}.jpg": os.urandom(20_000) for i in range(6)}  # incompressible: the cut lands in data
    path = pack(str(tmp_path / f"a.{ext}"), members)
    full = os.path.getsize(path)
    kept = truncate(path, 0.5)
    got = []
    with open(path, "rb") as f, pytest.raises(ArchiveBroken) as broken:
        for member in iter_members(f, KINDS[ext], size=full):
            got.append(member)
    assert 1 <= len(got) < len(members)
    assert all(members[m.name] == m.data for m in got)  # whole, never a partial member
    assert broken.value.error_type == "TruncatedArchive"
    message = str(broken.value)
    assert f"after {len(got)} image member" in message and f"(last read: {got[-1].name})" in message
    assert f"of {full:,}" in message and "at byte" in message
    assert int(message.split("at byte ")[1].split(" ")[0].replace(",", "")) <= kept


def test_garbage_is_a_corrupt_archive_not_a_crash():
    with pytest.raises(ArchiveBroken) as broken:
        _members(b"\x01" * 4096, "tar")
    assert broken.value.error_type == "CorruptArchive"
    with pytest.raises(ArchiveBroken):
        _members(b"PK\x03\x04" + os.urandom(4096), "zip")


def test_member_names_that_climb_out_are_refused():
    data = tar_with(
        [
            regular("../../escape.jpg", b"a"),
            regular("/etc/absolute.jpg", b"b"),
            regular("ok/../../up.jpg", b"c"),
            regular("C:/windows.jpg", b"d"),
            regular("fine/./x.jpg", b"e"),
        ]
    )
    members = _members(data, "tar")
    assert [(m.name, m.error and m.error[0]) for m in members] == [
        ("../../escape.jpg", "UnsafeMemberName"),
        ("/etc/absolute.jpg", "UnsafeMemberName"),
        ("ok/../../up.jpg", "UnsafeMemberName"),
        ("C:/windows.jpg", "UnsafeMemberName"),
        ("fine/x.jpg", None),
    ]
    assert all(m.data is None for m in members[:4])
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("../../zip-slip.jpg", b"z")
    ((name, error),) = [(m.name, m.error[0]) for m in _members(zipped.getvalue(), "zip")]
    assert (name, error) == ("../../zip-slip.jpg", "UnsafeMemberName")


def test_links_are_rows_and_never_followed(tmp_path):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"outside the archive")
    data = tar_with(
        [
            regular("a/real.jpg", b"real bytes"),
            link("a/sym.jpg", str(secret)),
            link("a/up.jpg", "../../../etc/passwd"),
            link("a/hard.jpg", "a/real.jpg", tarfile.LNKTYPE),
        ]
    )
    members = _members(data, "tar")
    assert [(m.name, m.error and m.error[0], m.data) for m in members] == [
        ("a/real.jpg", None, b"real bytes"),
        ("a/sym.jpg", "LinkMember", None),
        ("a/up.jpg", "LinkMember", None),
        ("a/hard.jpg", "LinkMember", None),
    ]


def test_a_member_claiming_a_huge_size_is_refused_without_being_held():
    data = forged_size_header("a/first.jpg", 2) + b"ok".ljust(512, b"\0")  # an honest member
    data += forged_size_header("a/huge.jpg", 10 * 2**40) + os.urandom(2048)  # claims 10 TiB
    tracemalloc.start()
    got = []
    with pytest.raises(ArchiveBroken) as broken:
        for member in iter_members(io.BytesIO(data), "tar"):
            got.append(member)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [(m.name, m.error and m.error[0]) for m in got] == [
        ("a/first.jpg", None),
        ("a/huge.jpg", "MemberTooLarge"),
    ]
    assert broken.value.error_type == "TruncatedArchive"
    assert peak < 20 * 2**20


@pytest.mark.parametrize("streamed", [False, True], ids=["sizes-in-header", "data-descriptor"])
def test_a_zip_bomb_member_is_refused_and_the_archive_goes_on(streamed):
    buffer = io.BytesIO()
    target = _Unseekable(buffer) if streamed else buffer  # unseekable: zipfile writes data descriptors
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a/bomb.jpg", bytes(64 * 2**20))  # 64 MiB of zeros, 64 KiB compressed
        archive.writestr("a/after.jpg", b"still read")
    tracemalloc.start()
    members = _members(buffer.getvalue(), "zip", max_member_bytes=8 * 2**20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [(m.name, m.error and m.error[0], m.data) for m in members] == [
        ("a/bomb.jpg", "MemberTooLarge", None),
        ("a/after.jpg", None, b"still read"),
    ]
    assert peak < 40 * 2**20  # the bomb's 64 MiB was never held


class _Unseekable(io.RawIOBase):
    def __init__(self, target):
        self._target = target

    def writable(self):
        return True

    def write(self, data):
        return self._target.write(data)


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_memory_does_not_grow_with_the_number_of_members(kind, tmp_path):
    def peak_for(count: int) -> int:
        path = str(tmp_path / f"{count}.{kind}")
        pack(path, {f"d/{i}.jpg": b"" for i in range(count)})
        tracemalloc.start()
        with open(path, "rb") as f:
            seen = sum(1 for _ in iter_members(f, kind))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert seen == count
        return peak

    small, large = peak_for(3_000), peak_for(30_000)
    assert large < 2 * small + 2**20, (small, large)  # ten times the members, not ten times the memory


def test_only_the_members_wanted_are_read(photo_members):
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as archive:
        for name, content in photo_members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    wanted = sorted(photo_members)[1::4]
    got = _members(data.getvalue(), "tar", wanted=set(wanted))
    assert [m.name for m in got] == wanted


def test_names_and_uris():
    assert split_member_uri("gs://b/x/shard-0001.tar!/a/b.jpg") == ("gs://b/x/shard-0001.tar", "a/b.jpg")
    assert split_member_uri("/data/a.zip!/c!/d.jpg") == ("/data/a.zip", "c!/d.jpg")
    assert split_member_uri("/data/photo!/x.jpg") is None  # not an archive's name
    assert safe_member_name("./a//b/./c.JPG") == "a/b/c.JPG"
    assert safe_member_name("a\\..\\..\\x.jpg") is None
    assert is_image_name("x/Y.JPEG") and not is_image_name("x/y.json") and not is_image_name("__MACOSX/a.jpg")


# --- classify and prepare over archives ------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model = create_model("squeezenet", num_classes=3, input_size=32)
    uri = str(tmp_path_factory.mktemp("model") / "m")
    save_artifact(
        model, new_manifest(model, "squeezenet", ["a", "b", "c"], "none", name="arch", version="1"), uri
    )
    return uri


def _rows(output: str, prefix: str) -> pd.DataFrame:
    frames = [pd.read_parquet(p) for p in sorted(glob.glob(f"{output}/{prefix}-*.parquet"))]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["image_uri"])


def test_classify_reads_archive_members_as_inputs(photo_members, model_dir, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    side = {"README.md": b"notes", "cat/0000.json": b"{}"}
    pack(str(inputs / "a.tar"), {**photo_members, **side})
    pack(str(inputs / "b.tar.gz"), photo_members)
    pack(str(inputs / "c.zip"), {**photo_members, "cat/broken.jpg": b"not a jpeg"})
    pack(str(inputs / "d.zip"), {f"x/{i}.jpg": os.urandom(30_000) for i in range(4)})
    truncate(str(inputs / "d.zip"), 0.6)
    (inputs / "plain.jpg").write_bytes(next(iter(photo_members.values())))
    output = str(tmp_path / "out")
    classify.run(["--input", str(inputs), "--model", model_dir, "--output", output])
    results, errors = _rows(output, "results"), _rows(output, "errors")
    expected = {f"{inputs}/{a}!/{name}" for a in ("a.tar", "b.tar.gz", "c.zip") for name in photo_members}
    assert set(results.image_uri) == expected | {f"{inputs}/plain.jpg"}
    by_uri = errors.set_index("image_uri")
    assert by_uri.loc[f"{inputs}/c.zip!/cat/broken.jpg", "error_type"] == "NotAnImage"
    damaged = by_uri.loc[f"{inputs}/d.zip"]
    assert (damaged.stage, damaged.error_type) == ("read", "TruncatedArchive")
    assert "archive broken after" in damaged.message
    members_before = errors.image_uri.str.startswith(f"{inputs}/d.zip!/").sum()
    assert members_before >= 1  # random bytes: decode errors, but read whole before the damage
    for row in results.itertuples():
        archive_member = row.image_uri.split("!/", 1)[1] if "!/" in row.image_uri else None
        if archive_member:
            data = photo_members[archive_member]
            assert row.sha256 == hashlib.sha256(data).hexdigest() and row.file_size == len(data)
    summary = json.loads(storage.read_text(f"{output}/summary.json"))
    assert summary["complete"] and summary["inputs"] == len(results) + len(errors)
    assert summary["archive_members_not_images"] == 2
    assert "2 archive members not images (passed over)" in capsys.readouterr().out


def test_listed_members_are_read_alone_and_missing_ones_are_rows(photo_members, model_dir, tmp_path):
    archive = pack(str(tmp_path / "shard.tar.gz"), photo_members)
    wanted = sorted(photo_members)[:3]
    listed = tmp_path / "list.txt"
    listed.write_text("".join(f"{archive}!/{name}\n" for name in [*wanted, "cat/nope.jpg"]))
    output = str(tmp_path / "out")
    classify.run(
        ["--input_list", str(listed), "--model", model_dir, "--output", output, "--max_error_rate", "1"]
    )
    assert sorted(_rows(output, "results").image_uri) == [f"{archive}!/{name}" for name in wanted]
    (missing,) = _rows(output, "errors").itertuples()
    assert (missing.image_uri, missing.error_type) == (f"{archive}!/cat/nope.jpg", "FileNotFoundError")


def test_archives_on_gcs(photo_members, model_dir, gcs_bucket, tmp_path):
    local = pack(str(tmp_path / "shard.zip"), photo_members)
    storage.write_atomic(f"{gcs_bucket}/shards/shard.zip", local_path=local)
    output = str(tmp_path / "out")
    classify.run(["--input", f"{gcs_bucket}/shards", "--model", model_dir, "--output", output])
    assert set(_rows(output, "results").image_uri) == {
        f"{gcs_bucket}/shards/shard.zip!/{n}" for n in photo_members
    }


def test_prepare_takes_classes_from_folders_inside_archives(photo_members, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    names = sorted(photo_members)
    pack(str(root / "part1.tar.gz"), {n: photo_members[n] for n in names[::2]})
    pack(
        str(root / "part2.zip"),
        {**{n: photo_members[n] for n in names[1::2]}, "stray.jpg": photo_members[names[0]]},
    )
    output = str(tmp_path / "prepared")
    prepare.run(["--input", str(root), "--output", output, "--image_size", "32"])
    stats = json.loads(storage.read_text(f"{output}/stats.json"))
    classes = sorted({n.split("/")[0] for n in names})
    assert json.loads(storage.read_text(f"{output}/labels.json")) == classes
    per_class = {c: sum(stats["counts"][s][c] for s in stats["counts"]) for c in classes}
    assert per_class == {c: sum(n.startswith(c + "/") for n in names) for c in classes}
    (stray,) = _rows(output, "errors").itertuples()
    assert (stray.image_uri, stray.error_type) == (f"{root}/part2.zip!/stray.jpg", "NoLabel")
    assert stats["inputs"] == len(names) + 1


def test_a_labels_csv_may_name_a_whole_archive_and_label_errors_on_members_are_counted(
    photo_members, tmp_path
):
    cats = pack(str(tmp_path / "cats.zip"), {n: d for n, d in photo_members.items() if n.startswith("cat/")})
    other = pack(str(tmp_path / "other.tar"), photo_members)
    rocket = sorted(n for n in photo_members if n.startswith("rocket/"))
    labels = tmp_path / "labels.csv"
    rows = [
        f"{cats},cat",
        f"{other}!/{rocket[0]},rocket",
        f"{other}!/{rocket[1]},rocket",
        f"{other}!/{rocket[1]},ship",
    ]
    labels.write_text("uri,label\n" + "".join(f"{row}\n" for row in [*rows, f"{other}!/{rocket[2]},"]))
    output = str(tmp_path / "prepared")
    flags = ["--input", str(tmp_path), "--labels", str(labels), "--output", output, "--image_size", "32"]
    prepare.run([*flags, "--max_error_rate", "1"])  # labelled inputs fail on purpose
    stats = json.loads(storage.read_text(f"{output}/stats.json"))
    cat_count = sum(n.startswith("cat/") for n in photo_members)
    per_class = {c: sum(stats["counts"][s][c] for s in stats["counts"]) for c in ("cat", "rocket")}
    assert per_class == {"cat": cat_count, "rocket": 1}  # the whole archive takes its line's label
    errors = _rows(output, "errors").set_index("image_uri")
    assert errors.loc[f"{other}!/{rocket[1]}", "error_type"] == "ConflictingLabels"
    assert errors.loc[f"{other}!/{rocket[2]}", "error_type"] == "NoLabel"
    assert stats["inputs"] == stats["examples"] + stats["errors"] == cat_count + 3


def test_a_listed_member_that_is_not_an_image_says_so(photo_members, model_dir, tmp_path):
    archive = pack(str(tmp_path / "shard.tar"), {**photo_members, "meta/notes.txt": b"hello"})
    listed = tmp_path / "list.txt"
    listed.write_text(f"{archive}!/meta/notes.txt\n{archive}!/{sorted(photo_members)[0]}\n")
    output = str(tmp_path / "out")
    classify.run(
        ["--input_list", str(listed), "--model", model_dir, "--output", output, "--max_error_rate", "1"]
    )
    (row,) = _rows(output, "errors").itertuples()
    assert (row.image_uri, row.error_type) == (f"{archive}!/meta/notes.txt", "NotAnImage")
    summary = json.loads(storage.read_text(f"{output}/summary.json"))
    assert (summary["inputs"], summary["results"], summary["complete"]) == (2, 1, True)


def test_reading_archives_releases_every_byte_it_counted(photo_members, tmp_path):
    """Members held against --buffer_mb are released once taken, also when an archive breaks."""
    import apache_beam as beam

    from beamvision.transforms.archives import GroupArchives
    from beamvision.transforms.concurrency import PROCESS_BYTES
    from beamvision.transforms.read import ImageFile, ReadFiles

    good = pack(str(tmp_path / "good.tar.gz"), photo_members)
    broken = pack(str(tmp_path / "broken.zip"), {f"x/{i}.jpg": os.urandom(40_000) for i in range(5)})
    truncate(broken, 0.5)
    streamed = io.BytesIO()
    with zipfile.ZipFile(_Unseekable(streamed), "w") as archive:  # data descriptors: sizes known once read
        for name, data in photo_members.items():
            archive.writestr(name, data)
    (tmp_path / "streamed.zip").write_bytes(streamed.getvalue())
    pipeline = beam.Pipeline()
    _ = (
        pipeline
        | beam.Create([ImageFile(good), ImageFile(broken), ImageFile(str(tmp_path / "streamed.zip"))])
        | GroupArchives()
        | ReadFiles(buffer_bytes=64 * 2**10)
    )
    result = pipeline.run()
    result.wait_until_finish()
    assert PROCESS_BYTES.used == 0
    assert most_bytes_held(result) >= max(len(d) for d in photo_members.values())


def test_prepare_reads_members_a_labels_csv_names(photo_members, tmp_path):
    archive = pack(str(tmp_path / "all.tar"), photo_members)
    names = sorted(photo_members)[:6]
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "uri,label\n" + "".join(f"{archive}!/{n},{'even' if i % 2 else 'odd'}\n" for i, n in enumerate(names))
    )
    output = str(tmp_path / "prepared")
    flags = ["--input", str(tmp_path), "--labels", str(labels), "--output", output, "--image_size", "32"]
    prepare.run([*flags, "--max_error_rate", "1"])  # labelled inputs fail on purpose
    stats = json.loads(storage.read_text(f"{output}/stats.json"))
    assert (stats["examples"], stats["inputs"]) == (6, 6)
    assert json.loads(storage.read_text(f"{output}/labels.json")) == ["even", "odd"]
