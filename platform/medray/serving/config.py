"""What `medray serve` and `serve deploy` need: which model, where, how it is guarded and scaled.

`configs/serve.yaml` holds exactly these defaults. Each model deployment has its own
autoscaling and concurrency settings; `max_ongoing_requests` must let dynamic batching
fill a batch (Ray Serve only forms batches of B when a replica may hold B requests).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from medray.config import Section, StageConfig


class Limits(Section):
    """Request limits enforced by the ingress before any model runs."""

    max_upload_bytes: int = Field(10_000_000, gt=0)
    """Largest accepted image file (bytes, after base64 decoding); larger -> 413."""
    max_pixels: int = Field(25_000_000, gt=0)
    """Largest decoded image (width x height); larger -> 413 (decompression-bomb guard)."""
    max_decode_bytes: int = Field(200_000_000, gt=0)
    """Decode budget: width x height x channels x bytes per sample, read from the header,
    larger -> 413 before any pixel is decoded. 200 MB takes every 8- and 16-bit image up to
    max_pixels (25 Mpx 16-bit RGB is 150 MB, RGBA 200 MB) and float32 RGB up to 16.7 Mpx;
    float64 RGB stops at 8.3 Mpx (a 4990 x 4990 one would be 598 MB)."""
    max_concurrent_decodes: int = Field(2, gt=0)
    """Images one ingress replica decodes at once (others wait their turn), so its decoding
    memory stays near this many x max_decode_bytes whatever the number of requests."""
    max_k: int = Field(100, gt=0)
    """Largest number of neighbours a client may ask for; larger -> 422."""
    default_k: int = Field(10, gt=0)
    """Neighbours returned when the request does not say."""


class Autoscaling(Section):
    """Ray Serve autoscaling_config of one deployment (replicas follow ongoing requests)."""

    min_replicas: int = Field(1, ge=0)
    """Fewest replicas kept running."""
    max_replicas: int = Field(2, ge=1)
    """Most replicas the autoscaler may start."""
    target_ongoing_requests: float = Field(2.0, gt=0)
    """Ongoing requests per replica the autoscaler aims for."""
    upscale_delay_s: float = Field(10.0, ge=0)
    """How long demand must stay high before a replica is added."""
    downscale_delay_s: float = Field(60.0, ge=0)
    """How long demand must stay low before a replica is removed."""
    look_back_period_s: float = Field(30.0, gt=0)
    """Window over which ongoing requests are averaged (short: reacts faster, noisier)."""

    @model_validator(mode="after")
    def _order(self) -> Autoscaling:
        if self.max_replicas < max(self.min_replicas, 1):
            raise ValueError("max_replicas must be >= min_replicas and >= 1")
        return self


class DeploymentConfig(Section):
    """Resources, concurrency and scaling of one Serve deployment."""

    num_cpus: float = Field(1.0, ge=0)
    """CPUs reserved per replica (fractions allowed; `medray serve` shrinks them to fit)."""
    num_gpus: float | Literal["auto"] = 0.0
    """GPUs per replica; `auto` takes 1 when the cluster has a GPU, else 0."""
    max_ongoing_requests: int = Field(8, gt=0)
    """Requests one replica may hold at once (queue + in progress)."""
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)


class EmbedderConfig(DeploymentConfig):
    """The embedder: backbone forward passes with dynamic batching."""

    num_gpus: float | Literal["auto"] = "auto"
    """GPUs per replica; `auto` takes 1 when the cluster has a GPU, else 0."""
    max_ongoing_requests: int = Field(16, gt=0)
    """Must be >= max_batch_size (one batch runs at a time per replica) so batches can fill."""
    autoscaling: Autoscaling = Field(
        default_factory=lambda: Autoscaling(target_ongoing_requests=4.0)
    )
    """Aim at half a batch per replica: batches still fill before a replica is added."""
    max_batch_size: int = Field(8, gt=0)
    """Images per forward pass (1 turns dynamic batching off)."""
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    """How long the first request of a batch waits for others."""

    @model_validator(mode="after")
    def _batches_can_fill(self) -> EmbedderConfig:
        # Serve only hands a replica max_ongoing_requests at a time, and @serve.batch runs one
        # batch at a time (max_concurrent_batches=1): fewer than B would cap every batch.
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size"
                f" ({self.max_batch_size}), or batches never fill"
            )
        return self


def _light(num_cpus: float, max_ongoing: int) -> DeploymentConfig:
    """Cheap per-request work (search, heads, HTTP parsing): many requests per replica."""
    return DeploymentConfig(
        num_cpus=num_cpus,
        max_ongoing_requests=max_ongoing,
        autoscaling=Autoscaling(target_ongoing_requests=8.0),
    )


class ServeConfig(StageConfig):
    """The served application: model, network, keys, limits, and each deployment's scaling."""

    model_name: str = "medray-demo"
    """Registered model name in MLflow."""
    model_alias: str | None = "production"
    """Alias to serve (models:/<name>@<alias>); ignored when model_version is set."""
    model_version: int | None = None
    """Exact version to serve (models:/<name>/<version>); overrides model_alias."""
    follow_interval_s: float = Field(10.0, ge=0)
    """How often `medray serve` re-reads the alias and swaps to the version it names now
    (promote, rollback); 0 pins the version found at start. Replicas always load the
    pinned version, never the alias, so a restart cannot mix versions."""
    bundle_path: str | None = None
    """A bundle directory (local or s3://) to serve instead of the registry (offline use)."""
    host: str = "127.0.0.1"
    """Address the HTTP proxy listens on (loopback by default)."""
    port: int = Field(8000, ge=0, le=65535)
    """HTTP port (0 picks a free one)."""
    api_keys_env: str = "MEDRAY_API_KEYS"
    """Environment variable holding comma-separated API keys."""
    api_keys_file: str | None = None
    """File with one API key per line (read when the env var is unset or empty)."""
    limits: Limits = Field(default_factory=Limits)
    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig)
    retriever: DeploymentConfig = Field(default_factory=lambda: _light(0.5, 32))
    classifier: DeploymentConfig = Field(default_factory=lambda: _light(0.5, 32))
    ingress: DeploymentConfig = Field(default_factory=lambda: _light(0.5, 64))
    shard_memory_mb: float | None = Field(None, gt=0)
    """A sharded index (index.shards > 1) is served by one Retriever deployment per shard,
    each scaled by `retriever`; this is the memory (MB, Ray's `memory` resource) each shard
    replica reserves, so a node takes only as many shards as it can hold (about 1.3 x a
    shard's index + gallery files). null: no reservation (Serve still spreads replicas)."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"
    """Serve's log level (controller, proxy, replicas); INFO logs every request."""
    app_name: str = "medray"
    """Serve application name (serve.status() and `serve deploy` use it)."""

    def model_uri(self) -> str:
        """The bundle this config serves: a path, models:/<name>/<version> or models:/<name>@<alias>."""
        if self.bundle_path:
            return self.bundle_path
        if self.model_version is not None:
            return f"models:/{self.model_name}/{self.model_version}"
        return f"models:/{self.model_name}@{self.model_alias or 'production'}"
