"""Real faults, real tests (integration, CPU): processes killed with SIGKILL, the S3 endpoint
taken away, crashes in the middle of writing.

- kill -9 of a Ray Train worker mid-epoch: the run resumes from the last checkpoint, no
  finished epoch is trained twice;
- kill -9 of the embed stage's model actor mid-run: Ray restarts it and retries its batches,
  in = embedded + quarantined, nothing lost;
- the S3 endpoint goes away for a few seconds during embed and during a bundle load: retried
  with backoff, nothing quarantined for it, nothing lost (a faulty TCP proxy in front of moto,
  so moto's in-memory objects survive the outage);
- a crash while writing an index or a bundle never leaves something that loads as valid.

Processes are only ever killed when they descend from this test process (the session's Ray
or a subprocess the test started) and carry the expected title. Tiny on purpose: timm's
`test_resnet` from random weights at 32 px, a few dozen images."""

from __future__ import annotations

import io
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medray import storage
from medray import workdir as wd
from medray.config import load_config

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
OUTAGE_S = 3.0
"""How long the S3 endpoint stays away once the first request has hit it."""
BUDGET_S = 1.0
"""Retry budget (MEDRAY_STORAGE_RETRY_S) where storage must stay away past it."""


# ---------------------------------------------------------------- processes


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def descendants(root: int) -> list[int]:
    """Every live process below `root` (from /proc: the session's raylet and its workers,
    or a subprocess and its children)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            parent = _ppid(int(entry))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def own_processes(title: str) -> list[int]:
    """PIDs below this test process whose command line (Ray's process title) has `title`."""
    return [p for p in descendants(os.getpid()) if title in cmdline(p)]


def kill9(pid: int, title: str) -> None:
    """SIGKILL `pid`, after checking it is ours and is what we think it is."""
    assert pid in descendants(os.getpid()), f"pid {pid} is not a descendant of this test"
    assert title in cmdline(pid), f"pid {pid} is {cmdline(pid)!r}, not {title}"
    os.kill(pid, signal.SIGKILL)


def wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stat = Path(f"/proc/{pid}/stat")
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return
        except OSError:
            return
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} still alive {timeout} s after SIGKILL")


# ---------------------------------------------------------------- a faulty S3 endpoint


class FaultyProxy:
    """A TCP proxy on 127.0.0.1 in front of moto's port. `down()` takes the endpoint away:
    open connections are reset and every new one is reset as soon as it arrives (counted in
    `refused`) until `up()`. moto behind it keeps its objects throughout."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.server = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.server.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.is_down = threading.Event()
        self.first_refused = threading.Event()
        self.refused = 0
        self.open: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @staticmethod
    def _reset(sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        sock.close()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.is_down.is_set():
                with self.lock:
                    self.refused += 1
                self.first_refused.set()
                self._reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                self._reset(client)
                continue
            upstream.settimeout(None)
            with self.lock:
                self.open.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with self.lock:
                self.open.discard(src)

    def down(self) -> None:
        self.is_down.set()
        with self.lock:
            victims, self.open = list(self.open), set()
        for sock in victims:
            self._reset(sock)

    def up(self) -> None:
        self.is_down.clear()

    def outage_after_first_hit(self, seconds: float) -> threading.Thread:
        """Go down now; come back `seconds` after the first request arrives (or after 60 s).
        Returns the thread; its `.hit_at` and `.up_at` are monotonic times."""
        with self.lock:
            self.refused = 0
        self.first_refused.clear()
        self.down()

        def run() -> None:
            self.first_refused.wait(60)
            thread.hit_at = time.monotonic()
            time.sleep(seconds)
            self.up()
            thread.up_at = time.monotonic()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def wait_quiet(self, quiet_s: float = 1.5, timeout: float = 20.0) -> None:
        """Wait until no connection has arrived for `quiet_s` (retries still in flight from
        a failed run have given up)."""
        deadline, last, since = time.monotonic() + timeout, self.refused, time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - since < quiet_s:
            time.sleep(0.1)
            if self.refused != last:
                last, since = self.refused, time.monotonic()

    def close(self) -> None:
        self.closed = True
        self.server.close()
        self.down()


@pytest.fixture
def s3_proxy(s3_server, monkeypatch):
    """A bucket behind a FaultyProxy; storage (and the Ray tasks embed starts) use the proxy.
    Ray workers get moto's dummy credentials too (medray forwards only the endpoint)."""
    import uuid

    import boto3

    proxy = FaultyProxy(int(s3_server.rsplit(":", 1)[1]))
    bucket = f"faults-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setattr(
        storage, "WORKER_ENV", (*storage.WORKER_ENV, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    )
    proxy.bucket = f"s3://{bucket}"
    try:
        yield proxy
    finally:
        proxy.close()


# ---------------------------------------------------------------- data


def png(rng: np.random.Generator, size: int = 32) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def image_workdir(workdir: Path, n: int, image_root: str, corrupt: int | None = None) -> list[str]:
    """`n` 32 px PNGs under `image_root` (local dir or s3://), one truncated when `corrupt`
    is given, and a manifest of them in `workdir`; returns the uris."""
    from medray.data.manifest import write_manifest

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        uri = storage.join(image_root, f"{i:03d}.png")
        data = png(rng)
        storage.write_bytes(uri, data[:50] if i == corrupt else data)
        rows.append({"id": f"{i:03d}", "uri": uri, "labels": [f"c{i % 2}"],
                     "patient_id": None, "split": "train"})  # fmt: skip
    write_manifest(str(workdir), pd.DataFrame(rows), source="faults", multi_label=False)
    return [r["uri"] for r in rows]


EMBED = [
    "backbone.name=test_resnet", "backbone.weights=random", "backbone.input_size=32",
    "pin_backbone=true", "batch_size=4", "shard_size=8", "decode_cpus=0.5", "read_threads=2",
    "ray.num_cpus=2", "ray.num_workers=1", "ray.cpus_per_worker=0.5",
]  # fmt: skip


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory) -> str:
    """One MLflow store for every embed run of this module (a new SQLite store costs seconds
    of schema migrations)."""
    return f"sqlite:///{tmp_path_factory.mktemp('faults-mlflow') / 'mlflow.db'}"


def embed_config(workdir: Path, store: str, *extra: str):
    from medray import embed

    overrides = [*EMBED, f"mlflow.tracking_uri={store}", *extra]
    return load_config(embed.Config, None, overrides, workdir=str(workdir))


def embedded_ids(workdir: Path) -> list[str]:
    from medray import embed

    frame, vectors = embed.read_embeddings(str(workdir))
    assert len(frame) == len(vectors) and np.isfinite(vectors).all()
    return sorted(frame["id"])


# ---------------------------------------------------------------- storage: what is retried


def test_transient_errors_are_retried_and_others_are_not(monkeypatch):
    from botocore.exceptions import ClientError, EndpointConnectionError

    def client_error(code: str, status: int) -> ClientError:
        body = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
        return ClientError(body, "GetObject")

    transient = [EndpointConnectionError(endpoint_url="http://s3"), ConnectionResetError(),
                 client_error("SlowDown", 503), client_error("InternalError", 500),
                 OSError("AWS Error NETWORK_CONNECTION during GetObject: curlCode: 7")]  # fmt: skip
    for exc in transient:
        assert storage.is_transient(exc), exc
    for exc in (client_error("NoSuchKey", 404), client_error("AccessDenied", 403),
                FileNotFoundError("x"), ValueError("bad")):  # fmt: skip
        assert not storage.is_transient(exc), exc
    monkeypatch.setattr(time, "sleep", lambda s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "ok"

    assert storage.retrying("read s3://b/k", flaky) == "ok" and len(calls) == 3
    with pytest.raises(storage.StorageUnavailable, match=r"read s3://b/k: storage unreachable"):
        storage.retrying("read s3://b/k", lambda: (_ for _ in ()).throw(TimeoutError()), 0)
    with pytest.raises(ValueError):  # not transient: raised at once, never retried
        storage.retrying("read s3://b/k", lambda: int("x"))


# ---------------------------------------------------------------- embed: actor killed


def test_embed_actor_killed_mid_run_loses_nothing(ray_local, mlflow_store, tmp_path, monkeypatch):
    from medray import embed

    n, corrupt = 30, 7
    work = tmp_path / "w"
    image_workdir(work, n, str(tmp_path / "images"), corrupt=corrupt)
    title = "MapBatches(Embedder)"
    seen: dict = {}
    add = embed.ShardWriter.add

    def add_then_kill(self, batch):
        add(self, batch)
        if "killed" not in seen:  # first batch back: the actor has most of the run ahead
            pids = own_processes(title)
            assert len(pids) == 1, [(p, cmdline(p)) for p in pids]
            seen.update(killed=pids[0], at=time.monotonic(), rows_before=self.embedded)
            kill9(pids[0], title)
            wait_gone(pids[0])

    monkeypatch.setattr(embed.ShardWriter, "add", add_then_kill)
    t0 = time.monotonic()
    res = embed.run(embed_config(work, mlflow_store, "debug.batch_delay_s=0.3"))
    took = time.monotonic() - t0
    assert "killed" in seen
    # The kill landed mid-run: most rows were still to come when the actor died.
    assert seen["rows_before"] <= 8, seen
    assert (res.images_in, res.count, res.quarantined) == (n, n - 1, 1)
    assert res.images_in == res.embedded_now + res.quarantined_now
    q = pd.read_parquet(wd.quarantine(str(work)))
    assert q["uri"].tolist() == [str(tmp_path / "images" / f"{corrupt:03d}.png")]
    assert embedded_ids(work) == sorted(f"{i:03d}" for i in range(n) if i != corrupt)
    print(f"\nembed actor kill: finished {time.monotonic() - seen['at']:.1f} s after the kill "
          f"(run {took:.1f} s), {res.count} embedded + {res.quarantined} quarantined = {n}")  # fmt: skip


# ---------------------------------------------------------------- embed: S3 away


def test_embed_survives_s3_outage_without_quarantine(
    ray_local, mlflow_store, s3_proxy, tmp_path, monkeypatch
):
    from medray import embed

    n, corrupt = 16, 3
    work = tmp_path / "w"
    image_workdir(work, n, f"{s3_proxy.bucket}/images", corrupt=corrupt)
    build = embed.build_dataset
    outage: dict = {}

    def build_with_outage(*args, **kwargs):
        ds = build(*args, **kwargs)
        outage["thread"] = s3_proxy.outage_after_first_hit(OUTAGE_S)  # before any image read
        return ds

    monkeypatch.setattr(embed, "build_dataset", build_with_outage)
    t0 = time.monotonic()
    res = embed.run(embed_config(work, mlflow_store))
    took = time.monotonic() - t0
    thread = outage["thread"]
    thread.join(1)
    assert s3_proxy.refused > 0 and hasattr(thread, "up_at"), "the outage never met a request"
    assert res.storage_retries > 0
    assert (res.images_in, res.count, res.quarantined) == (n, n - 1, 1)
    q = pd.read_parquet(wd.quarantine(str(work)))
    assert q["uri"].tolist() == [f"{s3_proxy.bucket}/images/{corrupt:03d}.png"], q
    assert not q["reason"].str.contains("unreadable|Connection|Endpoint|unavailable").any(), q
    assert embedded_ids(work) == sorted(f"{i:03d}" for i in range(n) if i != corrupt)
    print(f"\nembed S3 outage: {s3_proxy.refused} connections refused over "
          f"{thread.up_at - thread.hit_at:.1f} s, {res.storage_retries} retries, 0 quarantined "
          f"for it; run {took:.1f} s")  # fmt: skip


def test_storage_away_past_the_budget_fails_embed_and_quarantines_nothing(
    ray_local, s3_proxy, tmp_path, monkeypatch
):
    """The endpoint stays away longer than the retry budget: the read raises
    StorageUnavailable instead of quarantining the image, and the stage stops with a message
    that says to run it again (shards written so far are kept)."""
    from medray import embed
    from medray.config import BackboneConfig
    from medray.data.manifest import read_manifest
    from medray.models import load_backbone

    work = tmp_path / "w"
    uris = image_workdir(work, 4, f"{s3_proxy.bucket}/images")
    spec = load_backbone(BackboneConfig(name="test_resnet", weights="random", input_size=32)).spec
    monkeypatch.setenv(storage.RETRY_ENV, str(BUDGET_S))
    s3_proxy.down()
    batch = {"row": np.arange(2), "uri": np.array(uris[:2])}
    with pytest.raises(storage.StorageUnavailable, match=r"read s3://.*storage unreachable"):
        embed.decode_batch(batch, spec.model_dump(), threads=2)
    # The same read in a Ray Data task, through the stage's driver loop (decode only: the
    # model is not needed to see how a failed task is reported).
    cfg = embed_config(work, "sqlite:///unused.db", "shard_size=2")
    frame = read_manifest(str(work)).reset_index(drop=True)

    def decode_only(rows, cfg, spec, use_gpu):
        import ray

        return ray.data.from_pandas(rows).map_batches(
            embed.decode_batch, fn_kwargs={"spec": spec.model_dump(), "threads": 2},
            batch_size=2, batch_format="numpy", num_cpus=0.5,
            runtime_env={"env_vars": storage.worker_env()},
        )  # fmt: skip

    monkeypatch.setattr(embed, "build_dataset", decode_only)
    out = tmp_path / "emb"
    with pytest.raises(storage.StorageUnavailable) as err:
        embed.embed_shards(cfg, frame, spec, str(out), [0, 1], use_gpu=False)
    message = str(err.value)
    assert message.startswith("embed: stopped, storage unavailable: read s3://"), message
    assert "run the same command again to resume" in message and "quarantined" in message
    assert pd.read_parquet(wd.quarantine(str(work))).empty and not out.exists()
    print(f"\nstorage away past the budget: {message[:400]}")


# ---------------------------------------------------------------- pretrain: worker killed


def test_train_worker_killed_mid_epoch_resumes_from_last_checkpoint(ray_local, tmp_path):
    """A real SIGKILL of a Ray Train worker halfway through epoch 2 (the worker writes its
    pid and waits there: `debug.hold_at_epoch`); the run resumes from epoch 1's checkpoint."""
    from test_pretrain import config, make_tiles, metric_steps

    from medray.pretrain import run

    make_tiles(str(tmp_path), 80)  # 71 train rows: 4 steps of 16 per epoch (one worker)
    hold = tmp_path / "pretrain" / "byol" / "hold_pid"
    killed: dict = {}

    def killer() -> None:
        deadline = time.monotonic() + 300
        while not hold.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if hold.exists():
            pid = int(hold.read_text())
            killed.update(pid=pid, at=time.time())
            kill9(pid, "RayTrainWorker")

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    res = run(config(tmp_path, "epochs=2", "max_failures=1", "debug.hold_at_epoch=1",
                     "knn_max_images=0", "ray.num_cpus=2", "ray.num_workers=1"))  # fmt: skip
    thread.join(1)
    assert "pid" in killed, "the worker never reached the hold point"
    # Two attempts: from scratch, then from the checkpoint of epoch 1.
    starts = metric_history(res.mlflow_run_id, "start_epoch", tmp_path)
    assert [v for _, v, _ in starts] == [0, 1], starts
    # No finished epoch was trained twice; only the steps of the interrupted epoch are redone.
    assert [s for s, _ in metric_steps(res.mlflow_run_id, "epoch_loss", tmp_path)] == [1, 2]
    assert res.epochs_trained == [1, 2] and res.steps == 2 * 4 and res.exported_epoch == 2
    assert "last epoch's online encoder" in res.export_note
    steps = [s for s, _ in metric_steps(res.mlflow_run_id, "loss", tmp_path)]
    redone = len(steps) - len(set(steps))
    assert sorted(set(steps)) == list(range(1, 9)) and redone <= 4, steps  # <= one epoch
    resumed_s = starts[1][2] / 1000 - killed["at"]
    print(f"\ntrain worker kill -9: resumed from epoch 1's checkpoint {resumed_s:.1f} s after "
          f"the kill; 0 epochs redone, {redone} of 4 steps of the interrupted epoch redone; "
          f"run {res.seconds:.1f} s")  # fmt: skip


def test_resume_takes_the_newest_whole_checkpoint_on_storage(tmp_path):
    """Ray Train registers a reported checkpoint only when its controller next polls the
    workers: one killed in between leaves a newer checkpoint on storage than the one Ray
    hands back. The loop resumes from the newest one that loads whole."""
    import torch

    from medray.pretrain.loop import newest_saved_state

    run = tmp_path / "byol"
    for name, epoch in (("checkpoint_2026-01-01_00-00-01.000000", 1),
                        ("checkpoint_2026-01-01_00-00-02.000000", 2)):  # fmt: skip
        (run / name).mkdir(parents=True)
        torch.save({"epoch": epoch, "step": 4 * epoch}, run / name / "state.pt")
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    assert newest_saved_state(str(run))[1]["epoch"] == 2
    cut = run / "checkpoint_2026-01-01_00-00-03.000000"  # killed while it was uploaded
    cut.mkdir()
    data = (run / "checkpoint_2026-01-01_00-00-02.000000" / "state.pt").read_bytes()
    (cut / "state.pt").write_bytes(data[: len(data) // 2])
    uri, state = newest_saved_state(str(run))
    assert state["epoch"] == 2 and uri.endswith("00-00-02.000000")
    assert newest_saved_state(str(tmp_path / "nothing")) is None


def metric_history(run_id: str, key: str, workdir) -> list[tuple[int, float, int]]:
    """(step, value, timestamp ms) of every logged value of `key`, in logging order."""
    from mlflow import MlflowClient

    from medray import tracking
    from medray.config import MlflowConfig

    client = MlflowClient(tracking_uri=tracking.tracking_uri(MlflowConfig(), str(workdir)))
    history = client.get_metric_history(run_id, key)
    return [(m.step, m.value, m.timestamp) for m in sorted(history, key=lambda m: m.timestamp)]


# ---------------------------------------------------------------- crashes while writing

WRITER = "medray-fault-writer"
"""In the command line of the subprocesses that write and are killed (checked before kill)."""

CRASH_SCRIPT = r"""
import os, sys, time
from pathlib import Path

kind, out, stall_at, marker, parts = sys.argv[1:6]
real_replace = os.replace

def replace(src, dst):  # every medray write ends in a rename: stall at the chosen one
    if str(dst).replace(os.sep, "/").endswith(stall_at):
        Path(marker).write_text(str(os.getpid()))
        time.sleep(300)
    return real_replace(src, dst)

os.replace = replace
if kind == "index":
    import numpy as np, pandas as pd, faiss
    from medray.index import write_index
    vectors = np.random.default_rng(2).standard_normal((20000, 64)).astype("float32")
    index = faiss.IndexFlatIP(64)
    index.add(vectors)
    rows = pd.DataFrame({"id": [f"v2-{i}" for i in range(len(vectors))], "uri": "x",
                         "labels": [["a"]] * len(vectors), "split": "train"})
    write_index(out, index, rows, {"backbone_id": "b-2", "dim": 64, "count": len(vectors),
                                   "metric": "ip", "factory": "Flat", "nprobe": 1})
else:
    from medray.registry import build_bundle
    build_bundle(parts, out)
print("not killed")
"""


def crash_while_writing(kind: str, out: Path, stall_at: str, parts: Path | None = None) -> None:
    """Run CRASH_SCRIPT in a subprocess, wait until it stalls just before the rename that
    finishes `stall_at`, then kill -9 it."""
    marker = out.parent / f"{kind}.pid"
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASH_SCRIPT, kind, str(out), stall_at, str(marker), str(parts),
         WRITER],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.communicate(timeout=10)[0][-3000:]
        assert int(marker.read_text()) == proc.pid
        kill9(proc.pid, WRITER)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def small_index(n: int, tag: str):
    import faiss

    vectors = np.random.default_rng(1).standard_normal((n, 64)).astype("float32")
    index = faiss.IndexFlatIP(64)
    index.add(vectors)
    rows = pd.DataFrame({"id": [f"{tag}-{i}" for i in range(n)], "uri": "x",
                         "labels": [["a"]] * n, "split": "train"})  # fmt: skip
    meta = {"backbone_id": f"b-{tag}", "dim": 64, "count": n, "metric": "ip", "factory": "Flat",
            "nprobe": 1}  # fmt: skip
    return index, rows, meta


def test_index_killed_while_rewriting_never_loads_and_rerun_succeeds(tmp_path):
    from medray.index import load_index, write_index

    out = tmp_path / "index"
    write_index(str(out), *small_index(50, "v1"))  # a valid older index in the same place
    assert load_index(str(out)).meta["count"] == 50
    # Killed after the new index.faiss is in place, with the new gallery written to its
    # temp file but not renamed: old gallery, new index file, no index.json.
    crash_while_writing("index", out, "gallery.arrow")
    assert (out / "index.faiss").exists() and not (out / "index.json").exists()
    with pytest.raises(FileNotFoundError, match=r"index\.json: missing: an incomplete index"):
        load_index(str(out))
    write_index(str(out), *small_index(300, "v2"))  # the re-run
    assert load_index(str(out)).meta["count"] == 300


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Path:
    """A workdir with every part a bundle needs (tests/registry_parts.py, no Ray)."""
    from registry_parts import make_workdir

    root = tmp_path_factory.mktemp("faults-parts") / "w"
    make_workdir(root, n=15)
    return root


def test_bundle_killed_while_rebuilding_never_loads_and_rerun_succeeds(parts, tmp_path):
    from medray.registry import BundleError, build_bundle, load_bundle

    out = tmp_path / "bundle"
    build_bundle(str(parts), str(out))  # a valid bundle in the same place
    load_bundle(str(out))
    crash_while_writing("bundle", out, "heads/texture/head.safetensors", parts)
    assert (out / "index" / "index.json").exists() and not (out / "bundle.json").exists()
    with pytest.raises(BundleError, match=r"bundle\.json: missing: .*incomplete"):
        load_bundle(str(out))
    build_bundle(str(parts), str(out))  # the re-run
    assert load_bundle(str(out)).manifest["backbone_id"]


# ---------------------------------------------------------------- bundle load: S3 away


def test_bundle_load_survives_s3_outage(parts, s3_proxy):
    from medray.registry import build_bundle, load_bundle

    uri = f"{s3_proxy.bucket}/bundles/v1"
    manifest = build_bundle(str(parts), uri)
    before = storage.retry_count()
    thread = s3_proxy.outage_after_first_hit(OUTAGE_S)
    t0 = time.monotonic()
    bundle = load_bundle(uri)
    took = time.monotonic() - t0
    thread.join(1)
    assert s3_proxy.refused > 0 and hasattr(thread, "up_at")
    retries = storage.retry_count() - before
    assert retries > 0 and bundle.manifest["files"] == manifest["files"]
    assert len(bundle.index.gallery) == 15
    print(f"\nbundle load S3 outage: {s3_proxy.refused} connections refused over "
          f"{thread.up_at - thread.hit_at:.1f} s, {retries} retries, loaded in {took:.1f} s "
          f"({took - (thread.up_at - thread.hit_at):.1f} s more than the outage)")  # fmt: skip
