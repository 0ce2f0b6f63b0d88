"""segcore.fsio on a local path, a file:// URL, memory:// and s3:// (a local moto server)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from segcore import fsio

KINDS = ["local", "file", "memory", "s3"]


@pytest.fixture(params=KINDS)
def base(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty location of each kind."""
    if request.param == "local":
        return str(tmp_path / "out")
    if request.param == "file":
        return f"file://{tmp_path}/out"
    if request.param == "memory":
        return f"memory://segflow-test-{uuid.uuid4().hex}/out"
    return request.getfixturevalue("s3_server").bucket() + "/out"


def _names(locations: list[str], base: str) -> list[str]:
    return [loc[len(base) + 1:] for loc in locations]


@pytest.mark.parametrize(("location", "parts", "expected"), [
    ("s3://b/x", ("y",), "s3://b/x/y"),
    ("s3://b/x/", ("/y/", "z.json"), "s3://b/x/y/z.json"),
    ("runs/r1", ("dice", "run_id=7"), "runs/r1/dice/run_id=7"),
    ("memory://m", ("", "a"), "memory://m/a"),
    (Path("/tmp/r"), ("units",), "/tmp/r/units"),
])
def test_join_keeps_the_scheme(location: str | Path, parts: tuple[str, ...], expected: str) -> None:
    assert fsio.join(location, *parts) == expected


def test_is_local() -> None:
    assert fsio.is_local("runs/r1") and fsio.is_local("file:///tmp/x") and fsio.is_local(Path("/tmp"))
    assert not fsio.is_local("memory://x") and not fsio.is_local("s3://bucket/x")


def test_write_read_and_replace(base: str) -> None:
    loc = fsio.join(base, "a", "b.bin")
    assert not fsio.exists(loc)
    fsio.write_bytes(loc, b"first")
    assert fsio.exists(loc) and fsio.read_bytes(loc) == b"first"
    fsio.write_bytes(loc, b"second")
    assert fsio.read_bytes(loc) == b"second"
    assert _names(fsio.list_files(base), base) == ["a/b.bin"]
    fsio.write_json(fsio.join(base, "r.json"), {"b": 1, "a": [1, 2]})
    assert fsio.read_json(fsio.join(base, "r.json")) == {"a": [1, 2], "b": 1}


def test_failed_local_write_keeps_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    loc = str(tmp_path / "part.parquet")
    fsio.write_bytes(loc, b"whole")
    with pytest.raises(TypeError):
        fsio.write_bytes(loc, "not bytes")  # type: ignore[arg-type]  # fails after the temporary is opened
    assert fsio.read_bytes(loc) == b"whole"
    assert os.listdir(tmp_path) == ["part.parquet"]


def test_list_files_skips_hidden_names_and_filters(base: str) -> None:
    for name in ("u/unit-1.json", "u/unit-0.json", "u/.unit-2.json.abc.tmp", "u/_SUCCESS", "u/sub/x.json",
                 ".hidden/y.json", "_meta/z.json", "top.md"):
        fsio.write_bytes(fsio.join(base, name), b"{}")
    assert _names(fsio.list_files(base), base) == ["top.md", "u/sub/x.json", "u/unit-0.json", "u/unit-1.json"]
    assert _names(fsio.list_files(base, suffix=".json"), base) == ["u/sub/x.json", "u/unit-0.json", "u/unit-1.json"]
    units = fsio.join(base, "u")
    assert _names(fsio.list_files(units, recursive=False), units) == ["unit-0.json", "unit-1.json"]
    assert fsio.list_files(fsio.join(base, "missing")) == []
    found = fsio.list_files(units, suffix=".json", recursive=False)
    assert fsio.read_many(found) == [b"{}", b"{}"] and fsio.read_many([]) == []


def test_to_buffer() -> None:
    assert fsio.to_buffer(lambda f: f.write(b"abc")) == b"abc"


def test_listing_sees_files_written_by_another_process(s3_server) -> None:
    """Workers write with their own S3 clients; a listing cached before must not hide their files."""
    import s3fs

    base = s3_server.bucket() + "/run"
    fsio.write_bytes(fsio.join(base, "units", "unit-0.json"), b"{}")
    assert len(fsio.list_files(fsio.join(base, "units"))) == 1
    fs, _ = fsio.url_to_fs(base)
    fs.ls(fs._strip_protocol(fsio.join(base, "units")))  # the listing is now cached in this process
    other = s3fs.S3FileSystem(skip_instance_cache=True)  # a separate client, as in a worker process
    other.pipe_file(fs._strip_protocol(fsio.join(base, "units", "unit-1.json")), b"{}")
    assert fsio.exists(fsio.join(base, "units", "unit-1.json"))
    assert _names(fsio.list_files(fsio.join(base, "units")), fsio.join(base, "units")) == ["unit-0.json", "unit-1.json"]


def test_listing_a_parent_refreshes_stale_sub_directories(s3_server) -> None:
    """A cached listing of a sub-directory must not hide a part another process added there, even when
    the reader lists (and pyarrow opens) through the parent, as a Hive dataset reader does."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import s3fs

    from segcore.run.tables import read_table

    base = s3_server.bucket() + "/table"
    schema = pa.schema([("x", pa.int64())])
    part = fsio.to_buffer(lambda f: pq.write_table(pa.table({"x": [1]}, schema=schema), f))
    fsio.write_bytes(fsio.join(base, "run_id=a", "p0.parquet"), part)
    assert read_table(base, schema).num_rows == 1  # caches the listing of run_id=a in this process
    other = s3fs.S3FileSystem(skip_instance_cache=True)
    other.pipe_file(fsio.url_to_fs(fsio.join(base, "run_id=a", "p1.parquet"))[1], part)
    assert read_table(base, schema).num_rows == 2


def test_absolute_makes_plain_paths_absolute_and_keeps_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert fsio.absolute("landing/a.png") == str(tmp_path / "landing" / "a.png")
    assert fsio.absolute(tmp_path / "b.png") == str(tmp_path / "b.png")
    for url in ("s3://bucket/landing/a.png", "file:///data/a.png", "memory://x/a.png"):
        assert fsio.absolute(url) == url


def test_a_landing_zone_on_s3_is_listed_with_its_signatures_in_a_few_requests(s3_server, monkeypatch) -> None:
    """Listing and signing 40 images and 40 masks costs a handful of S3 requests, not several per
    file (a quiet hourly run on a landing zone of 10,000 objects must not make 40,000 of them)."""
    import s3fs

    from segcore.collection.sources import pair_sources

    bucket = s3_server.bucket()
    for i in range(40):
        fsio.write_bytes(f"{bucket}/landing/img-{i:03d}.png", b"i" * (i + 1))
        fsio.write_bytes(f"{bucket}/masks/img-{i:03d}.png", b"m" * (i + 1))
    calls: list[str] = []
    real = s3fs.S3FileSystem._call_s3

    async def counted(self, method, *args, **kwargs):
        calls.append(getattr(method, "__name__", str(method)))
        return await real(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counted)
    rows = pair_sources(f"{bucket}/landing", f"{bucket}/masks")
    assert len(rows) == 40 and len(calls) <= 8, calls
    for r in rows[:3]:  # the same signatures as asking for each file
        assert r["source_signature"] == fsio.signature(r["source_path"]) is not None
        assert r["mask_signature"] == fsio.signature(r["mask_path"]) is not None


def test_file_sha256_and_tree_are_the_same_for_every_kind(base: str, tmp_path: Path) -> None:
    """A file's (and a directory's) sha256 names its bytes wherever they are; ``tree`` lists a directory's files."""
    import hashlib

    payload = {"a.bin": b"alpha", "sub/b.bin": b"beta" * 300_000, ".hidden": b"h"}
    for name, data in payload.items():
        fsio.write_bytes(fsio.join(base, "d", name), data)
        fsio.write_bytes(str(tmp_path / "ref" / name), data)
    assert fsio.file_sha256(fsio.join(base, "d", "sub/b.bin")) == hashlib.sha256(b"beta" * 300_000).hexdigest()
    assert fsio.file_sha256(fsio.join(base, "d")) == fsio.file_sha256(tmp_path / "ref")
    listed = fsio.tree(fsio.join(base, "d"))
    assert [rel for rel, _ in listed] == [".hidden", "a.bin", "sub/b.bin"]
    assert [fsio.read_bytes(loc) for _, loc in listed] == [b"h", b"alpha", b"beta" * 300_000]
    assert fsio.local_path(base) == (None if base.startswith(("memory:", "s3:")) else base.removeprefix("file://"))


def test_write_problem_tells_what_stands_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    assert fsio.write_problem(tmp_path / "dir", folder=True) is None
    assert fsio.write_problem(tmp_path / "new" / "deeper", folder=True) is None  # made when written
    assert fsio.write_problem(tmp_path / "dir" / "m.safetensors", folder=False) is None
    assert fsio.write_problem(tmp_path / "file", folder=False) is None  # replaced when written
    assert fsio.write_problem(tmp_path / "file", folder=True) == f"{tmp_path / 'file'} is a file, not a folder"
    assert fsio.write_problem(tmp_path / "dir", folder=False) == f"{tmp_path / 'dir'} is a folder, not a file"
    under = fsio.write_problem(tmp_path / "file" / "a" / "b.zarr", folder=True)
    assert under == f"{tmp_path / 'file'} is a file, so nothing can be made under it"
    assert fsio.write_problem("memory://anything/at/all", folder=True) is None  # a store tells when written


def test_write_problem_names_a_folder_that_forbids_writing(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "locked").mkdir()
    # as root every folder allows writing: the permission check is what is asked here
    monkeypatch.setattr(fsio.os, "access", lambda path, mode: Path(path) != tmp_path / "locked")
    locked = f"{tmp_path / 'locked'} does not allow writing"
    assert fsio.write_problem(tmp_path / "locked" / "run", folder=True) == locked
    assert fsio.write_problem(tmp_path / "locked", folder=True) == locked
    assert fsio.write_problem(tmp_path / "locked" / "m.safetensors", folder=False) is not None
    assert fsio.write_problem(tmp_path / "open" / "m.safetensors", folder=False) is None


def test_without_secrets_keeps_what_locates_and_drops_what_authenticates() -> None:
    assert fsio.without_secrets("s3://key:secret@bucket/models/u.safetensors") == "s3://bucket/models/u.safetensors"
    assert fsio.without_secrets("https://host/m.segflow?X-Amz-Signature=abc#x") == "https://host/m.segflow"
    assert fsio.without_secrets("/data/models/u.safetensors") == "/data/models/u.safetensors"
    assert fsio.without_secrets(Path("rel/u.safetensors")) == "rel/u.safetensors"
    assert fsio.without_secrets("s3://key:p@ss@bucket/s.zarr") == "s3://bucket/s.zarr"  # the last '@' ends them
    assert fsio.without_secrets("simplecache::s3://k:s@b/x?y=1") == "simplecache::s3://b/x"
    assert fsio.without_secrets("/data/a@b/c?d") == "/data/a@b/c?d"  # a path is no URL
    assert fsio.without_secrets("tcp://127.0.0.1:8786") == "tcp://127.0.0.1:8786"
    # a command line: each URL in it, quotes kept
    assert (fsio.without_secrets("segflow train --store 's3://k:s@b/t.zarr?token=x' --lake=s3://u:p@l/lake --out m")
            == "segflow train --store 's3://b/t.zarr' --lake=s3://l/lake --out m")

