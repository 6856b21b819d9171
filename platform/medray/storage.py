"""Read and write artifacts by URI: a local path or `s3://bucket/key`.

One small module used by every stage. S3 goes through boto3 (objects) and
pyarrow's S3FileSystem (Parquet, Ray Data); both honour `AWS_ENDPOINT_URL`, so an
S3 API on loopback (moto's server) or MinIO works the same as AWS.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b")."""
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


def join(base: str, *parts: str) -> str:
    """Join URI parts with `/` (S3) or the OS separator (local)."""
    base = str(base)
    if is_s3(base):
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts if p]])
    return str(Path(base, *parts))


def resolve(uri: str) -> str:
    """Absolute local path (S3 URIs unchanged): stages may run from another cwd on a cluster."""
    return uri if is_s3(uri) else str(Path(uri).expanduser().resolve())


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_client():
    import boto3

    return boto3.client("s3", endpoint_url=_endpoint())


def arrow_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for Parquet and Ray Data."""
    if is_s3(uri):
        endpoint = _endpoint()
        kwargs: dict[str, Any] = {}
        if endpoint:
            parsed = urlparse(endpoint)
            kwargs = {"endpoint_override": parsed.netloc, "scheme": parsed.scheme or "http"}
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            kwargs["region"] = region
        bucket, key = split_s3(uri)
        return pafs.S3FileSystem(**kwargs), f"{bucket}/{key}".rstrip("/")
    return pafs.LocalFileSystem(), resolve(uri)


def exists(uri: str) -> bool:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        client = s3_client()
        try:
            client.head_object(Bucket=bucket, Key=key)
            return True
        except client.exceptions.ClientError:
            resp = client.list_objects_v2(Bucket=bucket, Prefix=key.rstrip("/") + "/", MaxKeys=1)
            return resp.get("KeyCount", 0) > 0
    return Path(uri).exists()


def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return Path(uri).read_bytes()


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically (local: temp file + rename), so a crash never leaves half a file."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def listdir(uri: str) -> list[str]:
    """Full URIs of the direct children of a directory/prefix (sorted; empty if absent)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        prefix = key.rstrip("/") + "/" if key else ""
        paginator = s3_client().get_paginator("list_objects_v2")
        names: set[str] = set()
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            names.update(o["Key"][len(prefix) :] for o in page.get("Contents", []))
            names.update(
                p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", [])
            )
        return [join(uri, n) for n in sorted(n for n in names if n)]
    path = Path(uri)
    return [str(p) for p in sorted(path.iterdir())] if path.is_dir() else []


def remove(uri: str) -> None:
    """Remove a file or a whole directory/prefix; absent is fine."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        client = s3_client()
        client.delete_object(Bucket=bucket, Key=key)
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=key.rstrip("/") + "/"):
            for obj in page.get("Contents", []):
                client.delete_object(Bucket=bucket, Key=obj["Key"])
        return
    path = Path(uri)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def makedirs(uri: str) -> None:
    if not is_s3(uri):
        Path(uri).mkdir(parents=True, exist_ok=True)


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    """Read one Parquet file or a directory of shards."""
    fs, path = arrow_fs(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


def write_table(table: pa.Table, uri: str) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes(uri, buf.getvalue())


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256(uri: str) -> str:
    """Checksum of a stored file (streamed for local files)."""
    if is_s3(uri):
        return sha256_bytes(read_bytes(uri))
    h = hashlib.sha256()
    with open(uri, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def local_file(uri: str) -> Iterator[str]:
    """A local path holding the file at `uri` (downloaded to a temp dir for S3)."""
    if not is_s3(uri):
        yield uri
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, os.path.basename(split_s3(uri)[1]) or "file")
        Path(path).write_bytes(read_bytes(uri))
        yield path


def upload_file(local_path: str, uri: str) -> None:
    """Copy a local file to `uri` (local or S3)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client().upload_file(local_path, bucket, key)
    else:
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local_path, uri)
