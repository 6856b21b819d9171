"""Storage by URI: the same calls on a local dir and on an S3 API served on loopback."""

from __future__ import annotations

import pyarrow as pa
import pytest

from medray import storage


def roundtrip(base: str) -> None:
    uri = storage.join(base, "a", "b.json")
    assert not storage.exists(uri)
    storage.write_json(uri, {"x": 1})
    assert storage.exists(uri) and storage.read_json(uri) == {"x": 1}
    storage.write_bytes(storage.join(base, "a", "c.bin"), b"\x00\x01")
    assert [u.rsplit("/", 1)[-1] for u in storage.listdir(storage.join(base, "a"))] == [
        "b.json",
        "c.bin",
    ]
    assert storage.exists(storage.join(base, "a"))  # a directory / prefix
    table = pa.table({"id": ["x", "y"], "labels": [["a"], []]})
    storage.write_table(table, storage.join(base, "t.parquet"))
    assert storage.read_table(storage.join(base, "t.parquet")).to_pylist() == table.to_pylist()
    assert storage.sha256(uri) == storage.sha256_bytes(storage.read_bytes(uri))
    with storage.local_file(uri) as path:
        assert open(path, "rb").read() == storage.read_bytes(uri)
    storage.remove(storage.join(base, "a"))
    assert not storage.exists(uri)


def test_local_roundtrip(tmp_path):
    roundtrip(str(tmp_path / "w"))


@pytest.mark.integration
def test_s3_roundtrip(s3_bucket):
    roundtrip(f"{s3_bucket}/prefix")


def test_join_and_split():
    assert storage.join("s3://b/p/", "x", "y.parquet") == "s3://b/p/x/y.parquet"
    assert storage.split_s3("s3://b/p/x") == ("b", "p/x")
    assert storage.join("/tmp/w", "data") == "/tmp/w/data"


def test_local_write_is_atomic_and_creates_parents(tmp_path):
    uri = str(tmp_path / "deep" / "dir" / "f.txt")
    storage.write_text(uri, "hello")
    assert storage.read_text(uri) == "hello"
    assert [p.name for p in (tmp_path / "deep" / "dir").iterdir()] == ["f.txt"]
