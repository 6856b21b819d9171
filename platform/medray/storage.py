"""Read and write artifacts by URI: a local path or `s3://bucket/key`.

One small module used by every stage. S3 goes through boto3 (objects) and
pyarrow's S3FileSystem (Parquet, Ray Data); both honour `AWS_ENDPOINT_URL`, so an
S3 API on loopback (moto's server) or MinIO works the same as AWS.

Transient S3 failures (connection refused or reset, timeouts, throttling, 5xx) are
retried with exponential backoff (0.2 s doubling to 5 s, jittered) for up to
`$MEDRAY_STORAGE_RETRY_S` seconds (default 60) per operation, then `StorageUnavailable` is
raised. That loop is the one retry policy of medray's boto3 client (botocore's own retries
are off unless AWS_RETRY_MODE / AWS_MAX_ATTEMPTS are set), so every retry is counted. A missing or forbidden object is not
transient and raises at once. Callers never quarantine on `StorageUnavailable`: the
stage fails and a re-run resumes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_ENV = "MEDRAY_STORAGE_RETRY_S"
"""Seconds one storage operation keeps retrying transient S3 errors before it gives up."""
DEFAULT_RETRY_S = 60.0
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.2, 5.0
WORKER_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
              "AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS", RETRY_ENV)  # fmt: skip
"""Storage settings a Ray task or actor needs to reach the driver's S3 endpoint the same way
(never credentials: cluster nodes have their own role)."""
_TRANSIENT_CODES = {
    "RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete", "SlowDown",
    "Throttling", "ThrottlingException", "RequestLimitExceeded", "InternalError",
    "ServiceUnavailable", "503", "500",
}  # fmt: skip
_TRANSIENT_TEXT = ("network_connection", "curlcode", "couldn't connect", "connection refused",
                   "connection reset", "connection was closed", "connection aborted",
                   "could not connect to the endpoint url", "timed out", "read timeout",
                   "connect timeout", "max retries exceeded", "slow_down", "slowdown",
                   "service unavailable", "internal_failure")  # fmt: skip


class StorageUnavailable(OSError):
    """Object storage stayed unreachable through every retry: a transient, infrastructure
    failure (never bad input). Run the same command again once storage is back."""


_retries = 0
_retries_lock = threading.Lock()


def retry_count() -> int:
    """Transient-error retries made by this process so far (all threads)."""
    return _retries


def retry_budget() -> float:
    """Seconds an operation retries transient errors: `$MEDRAY_STORAGE_RETRY_S`, default 60."""
    try:
        return max(0.0, float(os.environ.get(RETRY_ENV, DEFAULT_RETRY_S)))
    except ValueError:
        return DEFAULT_RETRY_S


def worker_env() -> dict[str, str]:
    """The driver's storage settings (`WORKER_ENV`) that are set, for Ray's runtime_env."""
    return {k: os.environ[k] for k in WORKER_ENV if os.environ.get(k)}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _transient_one(exc: BaseException) -> bool:
    from botocore import exceptions as bx

    if isinstance(exc, StorageUnavailable):
        return False  # already retried to the end of its budget
    if isinstance(exc, (bx.ConnectionError, bx.HTTPClientError, bx.IncompleteReadError)):
        return True
    if isinstance(exc, bx.ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return str(error.get("Code")) in _TRANSIENT_CODES or status >= 500 or status == 429
    try:
        from urllib3 import exceptions as ux

        if isinstance(exc, (ux.ProtocolError, ux.TimeoutError, ux.NewConnectionError)):
            return True
    except ImportError:  # pragma: no cover - botocore depends on urllib3
        pass
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if type(exc) is OSError:  # pyarrow's S3 errors: plain OSError with the SDK's message
        return transient_text(str(exc))
    return False


def transient_text(message: str) -> bool:
    """Whether an error message (of a library that flattens errors into text: pyarrow,
    MLflow's artifact downloads) describes a network or throttling failure."""
    text = message.lower()
    return any(t in text for t in _TRANSIENT_TEXT)


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` (or what it wraps) is a storage failure worth retrying: no connection,
    a reset or timed-out request, throttling, a 5xx. A missing object, a forbidden one or a
    malformed request is not."""
    return any(_transient_one(e) for e in _chain(exc))


def _backoff(attempt: int) -> float:
    return min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2**attempt) * random.uniform(0.5, 1.0)


def retrying(
    what: str,
    fn: Callable[[], T],
    budget: float | None = None,
    transient: Callable[[BaseException], bool] | None = None,
) -> T:
    """`fn()`, retried with exponential backoff while it fails transiently (`transient`,
    default `is_transient`) for at most `budget` seconds (default `retry_budget()`); then
    `StorageUnavailable` naming `what`. Other errors are raised at once."""
    global _retries
    budget = retry_budget() if budget is None else budget
    transient = transient or is_transient
    start, attempt = time.monotonic(), 0
    while True:
        try:
            return fn()
        except Exception as exc:
            if not transient(exc):
                raise
            elapsed, delay = time.monotonic() - start, _backoff(attempt)
            if elapsed + delay > budget:
                raise StorageUnavailable(
                    f"{what}: storage unreachable for {elapsed:.1f} s ({attempt + 1} attempts; "
                    f"retry budget {budget:g} s, ${RETRY_ENV}): {type(exc).__name__}: {exc}"
                ) from exc
            attempt += 1
            with _retries_lock:
                _retries += 1
            log.warning("%s: transient storage error, retry %d in %.1f s: %s: %s",
                        what, attempt, delay, type(exc).__name__, exc)  # fmt: skip
            time.sleep(delay)


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


_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()


def _boto_config():
    """Short connect timeout (a dead endpoint fails fast and is retried by `retrying`, with
    a read cut off half-way, which botocore cannot retry); botocore's own retries off, so
    `retrying` is the one policy, unless the user set AWS_RETRY_MODE / AWS_MAX_ATTEMPTS."""
    from botocore.config import Config

    kwargs: dict[str, Any] = {"connect_timeout": 5, "read_timeout": 60}
    if not (os.environ.get("AWS_RETRY_MODE") or os.environ.get("AWS_MAX_ATTEMPTS")):
        kwargs["retries"] = {"mode": "standard", "max_attempts": 1}
    return Config(**kwargs)


def s3_client():
    """A boto3 S3 client for the current endpoint and credentials, shared by the threads of
    this process (creating clients from several threads at once is not thread-safe)."""
    import boto3

    env = ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_PROFILE")
    key = (os.getpid(), _endpoint(), *(os.environ.get(k) for k in env))
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = boto3.session.Session().client(
                "s3", endpoint_url=_endpoint(), config=_boto_config()
            )
            _clients[key] = client
    return client


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
        kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=3)
        return pafs.S3FileSystem(**kwargs), f"{bucket}/{key}".rstrip("/")
    return pafs.LocalFileSystem(), resolve(uri)


def exists(uri: str) -> bool:
    """A file, or a directory/prefix with something under it."""
    if is_s3(uri):
        bucket, key = split_s3(uri)

        def look() -> bool:
            client = s3_client()
            try:
                client.head_object(Bucket=bucket, Key=key)
                return True
            except client.exceptions.ClientError as exc:
                if is_transient(exc):  # a 5xx is not "absent"
                    raise
            prefix = key.rstrip("/") + "/"
            resp = client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
            return resp.get("KeyCount", 0) > 0

        return retrying(f"exists {uri}", look)
    return Path(uri).exists()


def read_bytes(uri: str) -> bytes:
    """The whole object; an S3 read cut off half-way is retried from the start."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return retrying(
            f"read {uri}", lambda: s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        )
    return Path(uri).read_bytes()


def _replace_atomically(path: Path, fill: Callable[[str], None]) -> None:
    """`fill(temp path)` next to `path`, then rename over it: readers see the old file or the
    whole new one, never half of it. The temp file is removed if `fill` fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fill(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically (local: temp file + rename; S3: one PUT), so a crash never leaves
    half a file."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        retrying(f"write {uri}", lambda: s3_client().put_object(Bucket=bucket, Key=key, Body=data))
        return
    _replace_atomically(Path(uri), lambda tmp: Path(tmp).write_bytes(data))


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

        def names() -> set[str]:
            out: set[str] = set()
            paginator = s3_client().get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
                out.update(o["Key"][len(prefix) :] for o in page.get("Contents", []))
                out.update(
                    p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", [])
                )
            return out

        return [join(uri, n) for n in sorted(n for n in retrying(f"list {uri}", names) if n)]
    path = Path(uri)
    return [str(p) for p in sorted(path.iterdir())] if path.is_dir() else []


def remove(uri: str) -> None:
    """Remove a file or a whole directory/prefix; absent is fine."""
    if is_s3(uri):
        bucket, key = split_s3(uri)

        def delete() -> None:
            client = s3_client()
            client.delete_object(Bucket=bucket, Key=key)
            paginator = client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=key.rstrip("/") + "/"):
                for obj in page.get("Contents", []):
                    client.delete_object(Bucket=bucket, Key=obj["Key"])

        retrying(f"remove {uri}", delete)
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
    if is_s3(uri):
        return retrying(f"read {uri}", lambda: pq.read_table(path, filesystem=fs, columns=columns))
    return pq.read_table(path, filesystem=fs, columns=columns)


def table_bytes(table: pa.Table) -> bytes:
    """A table as the bytes of one Parquet file."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def write_table(table: pa.Table, uri: str) -> None:
    write_bytes(uri, table_bytes(table))


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
        retrying(f"upload {uri}", lambda: s3_client().upload_file(local_path, bucket, key))
    else:
        _replace_atomically(Path(uri), lambda tmp: shutil.copyfile(local_path, tmp))
