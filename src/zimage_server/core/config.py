"""One typed settings object, read from ``ZIMAGE_*`` env vars, a ``.env`` file and CLI flags.

Nothing reads the environment at import time: the CLI builds a ``Settings`` and passes it to
``create_app``, so tests can build servers with other settings in the same process.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, IPvAnyNetwork, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_MODEL = "Tongyi-MAI/Z-Image-Turbo"
PROMPT_BUCKETS = (0, 16, 32, 64, 128, 256, 512)  # divisors of the 512-token text window
AttentionBackend = Literal[
    "auto",
    "native",
    "_native_cudnn",
    "_native_flash",
    "_native_efficient",
    "_native_math",
    "flash",
    "_flash_3",
    "sage",
    "xformers",
]
Toggle = Literal["auto", "on", "off"]


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "zimage-server"


class EngineSettings(BaseModel):
    """The API-side scheduler: how much may wait, and how renders are batched."""

    max_queue: int = Field(16, ge=1, description="Renders waiting or running before 429.")
    max_batch_size: int = Field(1, ge=1, le=16, description="Compatible renders per batch.")
    batch_wait_ms: int = Field(0, ge=0, le=1000, description="How long to wait to fill a batch.")
    dispatch_ahead: int = Field(
        1, ge=0, le=4, description="Batches a worker queues behind the one it renders."
    )


class WorkerSettings(BaseModel):
    """One worker process: its start, its warm-up, and the fault-injection seams."""

    # No float16: Z-Image's transformer overflows in it (NaN, black images).
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto",
        description="The model's dtype; auto: bfloat16 on CUDA, float32 on CPU. bfloat16 on "
        "a CPU runs the GPU's numbers; float32 on a GPU, for comparisons.",
    )
    warmup: bool = True
    warmup_size: int = Field(1024, ge=256, le=2048, description="Square size of warm-up render.")
    warmup_steps: int = Field(2, ge=1, le=75)
    warmup_sizes: Annotated[list[int], NoDecode] = Field(
        default_factory=list, description="More square sizes to warm (and compile) at start."
    )
    worker_start_timeout_s: float = Field(
        900.0, gt=0, description="A worker not ready by then is ended and started again."
    )
    shared_memory_results: bool = Field(
        True, description="Images reach the API through /dev/shm, not pickled through the pipe."
    )
    # Fault-injection seams for tests and chaos drills; harmless at their defaults.
    debug_step_delay_s: float = Field(0.0, ge=0, description="Sleep after each denoising step.")
    debug_faults: bool = Field(
        False, description="Let prompt markers such as [[fault:error]] raise in the worker."
    )

    @field_validator("warmup_sizes", mode="before")
    @classmethod
    def _split_sizes(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("warmup_sizes")
    @classmethod
    def _valid_sizes(cls, value: list[int]) -> list[int]:
        for size in value:
            if not 256 <= size <= 2048:
                raise ValueError(f"warm-up sizes must be in 256..2048, got {size}")
        return value


class SpeedupSettings(BaseModel):
    """The worker's speed-ups; benchmarks/README.md measures each. ``auto``: on for CUDA.

    The lossy ones (fp8, step_cache) are off by default: random weights cannot show what
    they do to an image.
    """

    prompt_bucket_tokens: int = Field(
        64, description="Pad prompts to the batch's longest, rounded up to this; 0 = 512 as stock."
    )
    prompt_cache_size: int = Field(32, ge=0, le=4096, description="Prompt embeddings kept.")
    attention_backend: AttentionBackend = Field("auto", description="diffusers backend name.")
    compile: Toggle = Field("auto", description="Regional torch.compile (auto: on for CUDA).")
    compile_mode: Literal[
        "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
    ] = Field("default", description="torch.compile mode; reduce-overhead adds CUDA graphs.")
    compile_dynamic: bool = Field(True, description="One compiled graph for every size.")
    compile_vae: Toggle = Field("auto", description="Compile the VAE decoder too.")
    compile_real_rope: bool = Field(True, description="Compiled RoPE in real arithmetic.")
    vae_channels_last: Toggle = Field("auto", description="Channels-last VAE decode.")
    prefetch_prompts: Toggle = Field(
        "auto", description="Encode queued prompts while a batch denoises (auto: on for CUDA)."
    )
    fp8: bool = Field(False, description="fp8 matmuls via torchao (lossy; Ada/Hopper GPUs).")
    step_cache: float = Field(
        0.0, ge=0, le=1, description="First-block cache threshold (lossy); 0 = off."
    )

    @field_validator("prompt_bucket_tokens")
    @classmethod
    def _valid_bucket(cls, value: int) -> int:
        if value not in PROMPT_BUCKETS:
            allowed = ", ".join(map(str, PROMPT_BUCKETS))
            raise ValueError(f"prompt_bucket_tokens must be one of {allowed}; got {value}")
        return value

    @staticmethod
    def enabled(toggle: Toggle, device: str) -> bool:
        return toggle == "on" or (toggle == "auto" and device.startswith("cuda"))


class LoraSettings(BaseModel):
    """LoRA adapters per request: how many, how large, and what the worker keeps loaded."""

    max_loras: int = Field(3, ge=0, le=8, description="Adapters per request; 0 turns LoRAs off.")
    lora_max_rank: int = Field(
        64, ge=1, le=1024, description="Rank of the hot-swap slots; higher-rank adapters get 400."
    )
    lora_max_bytes: int = Field(
        1024 * 2**20, ge=1, description="Largest adapter file accepted (and downloaded)."
    )
    lora_cache_size: int = Field(8, ge=1, description="Adapters kept loaded on each worker.")
    lora_cache_bytes: int = Field(
        4 * 2**30, ge=1, description="Memory the adapters kept on each worker may take."
    )


Section = TypeVar("Section", EngineSettings, WorkerSettings, SpeedupSettings, LoraSettings)


def section(settings: BaseModel, kind: type[Section]) -> Section:
    """The ``kind`` part of ``settings`` as an object of exactly that type (for pickling
    to a worker, or handing to code that must not see the rest)."""
    return kind.model_validate(settings.model_dump(include=set(kind.model_fields)))


class Settings(EngineSettings, WorkerSettings, SpeedupSettings, LoraSettings, BaseSettings):
    """Server configuration. Every field is also the env var ``ZIMAGE_<FIELD>``.

    The engine's, worker's and speed-ups' fields are declared once, in their own models;
    ``settings.engine``, ``.worker`` and ``.speedups`` hand those parts down unchanged.
    """

    model_config = SettingsConfigDict(env_prefix="ZIMAGE_", env_file=".env", extra="ignore")

    model: str = Field(DEFAULT_MODEL, description="Hub id (from the local HF cache) or folder.")
    tiny: bool = Field(False, description="Serve the tiny random model (built on first use).")
    controlnet: str | None = Field(
        None,
        description="ZImageControlNetModel weights (hub id in the local HF cache, or a "
        "diffusers folder); unset = the ControlNet slug answers 404.",
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: Literal["auto", "cuda", "cpu"] = "auto"
    data_dir: Path = Field(default_factory=_default_data_dir)
    public_url: str | None = Field(None, description="Base URL for image links behind a proxy.")

    output_ttl_s: int = Field(3600, ge=1, description="How long generated images stay served.")
    output_bucket: str | None = Field(
        None, description="S3-compatible bucket for images; unset = the local data folder."
    )
    output_s3_endpoint: str | None = Field(
        None, description="Endpoint URL of MinIO, R2, GCS (S3 mode)...; unset = AWS S3."
    )
    output_s3_region: str | None = Field(None, description="The bucket's region, if needed.")
    output_s3_prefix: str = Field("outputs/", description="Key prefix of images in the bucket.")
    output_urls: Literal["api", "presigned"] = Field(
        "api",
        description="Image URLs: through this API (streamed from the bucket) or presigned "
        "URLs to the bucket, valid for the output TTL (with a bucket only).",
    )
    request_timeout_s: float = Field(300.0, gt=0, description="Default v1 deadline (then 504).")
    hold_grace_s: float = Field(
        60.0,
        gt=0,
        le=86_400,
        description="How long past its deadline a request's credit hold is kept before the "
        "sweep returns it (a server killed mid-render, a refund the database refused).",
    )
    key_cache_s: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="How long a key this process has verified is trusted without a database "
        "lookup (0: every request looks it up); its disabling still counts at once at the "
        "credit hold.",
    )
    ledger_sync_holds: bool = Field(
        True,
        description="Fsync each request's credit hold on its own commit; false lets the "
        "commit that settles it make it durable (one fsync a request instead of two).",
    )
    max_prompt_chars: int = Field(10_000, ge=1, description="Longer prompts get a 400.")
    v1_default_response: Literal["json", "binary"] = "json"

    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default: SQLite file in the data folder."
    )
    auth: bool | None = Field(None, description="Require API keys (default: on, off for --tiny).")
    admin_token: SecretStr | None = Field(None, description="Enables the admin API when set.")
    price_reference: float = Field(
        1.0, ge=0, description="Credits for one 1024x1024, 8-step image; scales with both."
    )
    price_minimum: float = Field(0.01, ge=0, description="Floor of the price of one image.")
    price_lora_surcharge: float = Field(
        0.0, ge=0, le=100, description="Extra share of an image's price when it uses LoRAs."
    )
    price_controlnet_surcharge: float = Field(
        0.5, ge=0, le=100, description="Extra share of a ControlNet image's price."
    )
    lora_dir: Path | None = Field(
        None, description="Installed LoRA adapters; default: the data folder's loras/."
    )
    lora_allow_urls: bool = Field(False, description="Let requests name adapters by HTTPS URL.")
    lora_download_cache_bytes: int = Field(
        20 * 2**30,
        ge=1,
        description="Disk the adapters fetched by URL may take; least recently used go first.",
    )
    lora_download_timeout_s: float = Field(
        120.0, gt=0, description="One adapter download, DNS included."
    )
    lora_ca_file: Path | None = Field(
        None, description="Extra CA certificates (PEM) trusted for adapter downloads."
    )
    default_rate_limit: str = Field("120/minute", description="Per key, `limits` notation.")
    default_max_in_flight: int = Field(4, ge=1, description="Per key, concurrent requests.")
    rate_limit_storage: str = Field("memory://", description="`limits` storage URL (redis://...).")

    job_timeout_s: float = Field(600.0, gt=0, description="Default deadline of a v2 job.")
    job_retries: int = Field(1, ge=0, le=5, description="Re-runs of a job whose worker died.")
    stream_keepalive_s: float = Field(
        15.0, gt=0, description="An event stream's keep-alive comment after this much quiet."
    )
    stream_buffer_events: int = Field(
        8, ge=1, le=1000, description="Unread steps per stream reader; older ones are dropped."
    )
    stream_retention_s: float = Field(
        300.0, ge=0, description="How long a finished render's events stay for reconnects."
    )
    stream_redis_url: str | None = Field(
        None,
        description="Redis that carries v2 job events to every API process; default: "
        "`rate_limit_storage` when that is Redis.",
    )
    job_lease_s: float = Field(
        10.0,
        ge=0.5,
        le=3600,
        description="Lease of an API process on a job or webhook it runs, renewed every third "
        "of it; when its process dies, another takes the work over after this long.",
    )
    webhook_secret: SecretStr | None = Field(
        None, description="HMAC-SHA256 key for webhook signatures; unset = webhooks refused."
    )
    webhook_allowed_hosts: list[str] = Field(
        default_factory=list, description="Hosts allowed even if private or loopback."
    )
    webhook_allow_private: bool = Field(False, description="Allow private/loopback targets.")
    webhook_allowed_networks: list[IPvAnyNetwork] = Field(
        default_factory=list, description="Networks allowed even if private (CIDR)."
    )
    webhook_dns_servers: list[str] = Field(
        default_factory=list, description="Name servers for webhook hosts; default: system."
    )
    webhook_max_attempts: int = Field(8, ge=1, le=30)
    webhook_backoff_s: float = Field(1.0, gt=0, description="First retry delay; doubles.")
    webhook_timeout_s: float = Field(10.0, gt=0, description="One attempt, DNS included.")
    webhook_max_in_flight_per_key: int = Field(4, ge=1, description="Deliveries of one key.")
    webhook_max_in_flight: int = Field(64, ge=1, description="Deliveries in flight in all.")

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "text"] = Field(
        "auto", description="auto: readable on a terminal, one JSON object per line otherwise."
    )
    log_prompts: bool = Field(False, description="Include prompts in the access log.")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Larger bodies get 413.")
    input_max_body_bytes: int = Field(
        # ControlNet inpainting's three largest inputs as base64 (4/3 x 16 MiB each), and
        # the JSON around them
        65 * 2**20,
        ge=1024,
        description="Body limit of the image-input routes (413 above).",
    )
    input_max_bytes: int = Field(
        16 * 2**20, ge=1024, description="Largest input image file (upload, base64 or URL)."
    )
    input_max_pixels: int = Field(
        4096 * 4096, ge=65536, description="Largest input image, in pixels (bombs refused)."
    )
    input_fetch_timeout_s: float = Field(
        10.0, gt=0, description="Fetching one input image URL, DNS included."
    )
    input_allowed_networks: list[IPvAnyNetwork] = Field(
        default_factory=list, description="Private networks input image URLs may reach (CIDR)."
    )
    shutdown_grace_s: float = Field(30.0, ge=0, description="Drain time on SIGTERM.")
    output_min_free_bytes: int = Field(
        100 * 2**20, ge=0, description="Refuse renders (507) when the output disk has less."
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Host names the server answers to (comma-separated; '*.example.com', "
        "'*' for any); default: loopback, ZIMAGE_HOST and ZIMAGE_PUBLIC_URL's host.",
    )
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Addresses or networks whose X-Forwarded-For/-Proto are believed.",
    )
    metrics_token: SecretStr | None = Field(
        None, description="When set, /metrics needs 'Authorization: Bearer <token>'."
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="A request's line and headers must arrive within this."
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="A request's body must arrive within this (then 408)."
    )

    @field_validator("allowed_hosts", "trusted_proxies", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _valid_networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            if entry != "*":
                ipaddress.ip_network(entry, strict=False)  # ValueError names the entry
        return value

    @field_validator("admin_token", "webhook_secret", "metrics_token", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        """An empty secret would open the admin API to anyone, or sign webhooks with a
        key everyone knows: blank means unset (the feature stays off)."""
        secret = value.get_secret_value() if isinstance(value, SecretStr) else value
        return None if isinstance(secret, str) and not secret.strip() else value

    @field_validator("public_url")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _fp8_needs_gpu(self) -> Settings:
        if self.fp8 and self.device == "cpu":
            raise ValueError("fp8 needs an NVIDIA GPU (compute capability 8.9+), not device=cpu")
        return self

    @field_validator("default_rate_limit")
    @classmethod
    def _valid_limit(cls, value: str) -> str:
        from zimage_server.accounts.limits import parse_limit
        from zimage_server.core.errors import InvalidRequest

        try:
            parse_limit(value)  # the bounds a key's own limit must keep
        except InvalidRequest as exc:
            raise ValueError(exc.message) from None
        return value

    @property
    def engine(self) -> EngineSettings:
        return section(self, EngineSettings)

    @property
    def worker(self) -> WorkerSettings:
        return section(self, WorkerSettings)

    @property
    def speedups(self) -> SpeedupSettings:
        return section(self, SpeedupSettings)

    @property
    def loras(self) -> LoraSettings:
        return section(self, LoraSettings)

    @property
    def loras_dir(self) -> Path:
        return self.lora_dir or self.data_dir / "loras"

    @property
    def lora_download_dir(self) -> Path:
        return self.data_dir / "lora-downloads"

    @property
    def served_hosts(self) -> frozenset[str]:
        """The host names requests may name: ``allowed_hosts``, or by default loopback, the
        address listened on (unless every address) and the public URL's host."""
        if self.allowed_hosts:
            return frozenset(self.allowed_hosts)
        hosts = {"localhost", "127.0.0.1", "::1"}
        if self.host not in ("", "0.0.0.0", "::"):  # noqa: S104 - every address names none
            hosts.add(self.host.strip("[]"))
        if self.public_url and urlsplit(self.public_url).hostname:
            hosts.add(str(urlsplit(self.public_url).hostname))
        return frozenset(hosts)

    @property
    def auth_required(self) -> bool:
        return self.auth if self.auth is not None else not self.tiny

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'zimage.db'}"

    @property
    def outputs_dir(self) -> Path:
        return self.data_dir / "outputs"

    @property
    def compile_cache_dir(self) -> Path:
        return self.data_dir / "compile-cache"

    @property
    def tiny_model_dir(self) -> Path:
        return self.data_dir / "models" / "tiny"
