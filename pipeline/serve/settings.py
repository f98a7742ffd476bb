"""The gateway's settings: environment variables (the names in the README), else a YAML file, else defaults.

pydantic-settings reads them; a bad value becomes one `KilnError` line naming the variable.
Lists (API keys, CORS origins) are comma-separated strings, so they read the same from a shell
and from YAML.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

from pipeline.errors import KilnError
from pipeline.serve.edge import TrustedProxies
from pipeline.serve.guards import route_limits

CONFIG_ENV = "KILN_SERVE_CONFIG"  # a YAML file of the same settings, lowercase keys


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=False, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_concurrent_inference: int = Field(16, ge=1, description="requests in flight across all replicas")
    kiln_max_queue: int = Field(64, ge=0, description="requests waiting; past it: 429 at once")
    inference_timeout_sec: float = Field(120.0, gt=0, description="a whole request, queue wait included")
    llm_input_max_length: int = Field(2048, ge=1, description="characters of input the model sees")
    llm_fallback_response: str | None = Field(None, description="answer 200 with this instead of a 5xx")
    kiln_api_keys: str = Field("", description="comma-separated; empty: no authentication")
    kiln_admin_keys: str = Field("", description="comma-separated keys allowed to POST /admin/reload")
    kiln_rate_limit_rpm: float = Field(0, ge=0, description="requests per minute per key (or client); 0: off")
    kiln_rate_limit_burst: int = Field(10, ge=1)
    kiln_cors_origins: str = Field("", description="comma-separated origins; empty: no CORS headers")
    kiln_replicas: int = Field(2, ge=0, le=64, description="local llama-servers; 0 only with KILN_REPLICA_URLS")
    kiln_replica_urls: str = Field("", description="comma-separated llama-server URLs `kiln replica` runs elsewhere")
    kiln_replica_key: str = Field("", description="the key those `kiln replica` processes were started with")
    kiln_slots: int = Field(4, ge=1, description="parallel sequences per llama-server (continuous batching)")
    kiln_threads: int = Field(0, ge=0, description="CPU threads per replica; 0: cores / replicas")
    kiln_poll_sec: float = Field(10.0, ge=0, description="registry poll for a moved alias; 0: off")
    kiln_drain_sec: float = Field(60.0, ge=0, description="how long an old version may finish its requests")
    kiln_warmup_requests: int = Field(3, ge=0)
    kiln_context_shift: bool = Field(False, description="keep generating past a full context by dropping old tokens")
    kiln_quant: str = "Q4_K_M"
    kiln_canary_auto: bool = Field(False, description="decide the canary by analysis: promote, hold or abort")
    kiln_canary_min_requests: int = Field(50, ge=1, description="requests each version needs before a decision")
    kiln_canary_interval_sec: float = Field(10.0, gt=0, description="how often --canary-auto looks")
    kiln_canary_alpha: float = Field(0.05, gt=0, lt=0.5, description="chance of aborting a canary like production")
    kiln_canary_beta: float = Field(0.10, gt=0, lt=0.5, description="chance of passing one worse by the margin")
    kiln_canary_latency_ratio: float = Field(1.5, gt=1, description="a canary request over this x production's P95")
    kiln_canary_ttft_ratio: float = Field(1.5, gt=1, description="a first token later than this x production's P95")
    kiln_canary_tokens_per_s_ratio: float = Field(1.5, gt=1, description="slower than production's P5 / this")
    kiln_trace_sample: float = Field(1.0, ge=0, le=1, description="share of requests recorded as MLflow traces")
    kiln_on_demand_versions: int = Field(
        1, ge=0, description="registered versions a request may name beyond those in rotation (started on first use)"
    )
    kiln_trace_queue: int = Field(2000, ge=1, description="traces waiting to be written; past it: dropped, counted")
    kiln_trace_nice: str = Field(
        "idle", pattern=r"^(idle|1?[0-9])$",
        description="the trace writer's CPU priority: idle (it runs only on a core nothing else wants) or a niceness "
        "0..19; at 19 it still took a share of the replicas' cores and cost a fifth of the tokens/s at 16 clients",
    )  # fmt: skip
    # production traffic: body size, message count, trust, per-route limits, hung and crashing replicas
    kiln_max_body_bytes: int = Field(1 << 20, ge=1024, description="request body limit; past it: 413 unparsed")
    kiln_max_messages: int = Field(256, ge=1, description="chat messages per request; past it: 422")
    kiln_trusted_proxies: str = Field("", description="comma-separated addresses/CIDRs whose X-Forwarded-For counts")
    kiln_api_key_hashes: str = Field("", description="comma-separated sha256 hex digests of accepted API keys")
    kiln_route_rate_limits: str = Field("", description="ROUTE=RPM,... a route's own per-client limit")
    kiln_auth_failures_per_min: float = Field(10, ge=0, description="failed authentications per address; 0: off")
    kiln_first_token_timeout_sec: float = Field(30.0, gt=0, description="per attempt; then the replica is hung")
    kiln_restart_backoff_max_sec: float = Field(60.0, gt=0, description="cap of a crashing replica's backoff")
    kiln_replica_nice: int = Field(
        10, ge=0, le=19,
        description="replicas' CPU priority below the gateway's (nice); 0: the same. On shared cores the gateway's "
        "event loop then never waits behind llama-server's compute threads",
    )  # fmt: skip

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = os.environ.get(CONFIG_ENV)
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)

    @staticmethod
    def _split(value: str) -> list[str]:
        return [v.strip() for v in value.split(",") if v.strip()]

    @property
    def api_keys(self) -> set[str]:
        return set(self._split(self.kiln_api_keys))

    @property
    def admin_keys(self) -> set[str]:
        return set(self._split(self.kiln_admin_keys))

    @property
    def api_key_hashes(self) -> set[str]:
        return set(self._split(self.kiln_api_key_hashes))

    @field_validator("kiln_api_key_hashes")
    @classmethod
    def _hex_digests(cls, value: str) -> str:
        for digest in cls._split(value):
            if len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest):
                raise ValueError(f"{digest[:12]}...: not a sha256 hex digest (64 hex digits)")
        return value

    @field_validator("kiln_route_rate_limits")
    @classmethod
    def _route_limits(cls, value: str) -> str:
        route_limits(value)  # raises ValueError naming the bad part
        return value

    @field_validator("kiln_replica_urls")
    @classmethod
    def _replica_urls(cls, value: str) -> str:
        for url in cls._split(value):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.port is None:
                raise ValueError(f"{url}: a replica URL is http://HOST:PORT (as `kiln replica` prints it)")
        return value

    @model_validator(mode="after")
    def _some_replica(self):
        if self.kiln_replicas == 0 and not self.replica_urls:
            raise ValueError("KILN_REPLICAS is 0 and no KILN_REPLICA_URLS are given: nothing would serve")
        if self.replica_urls and not self.kiln_replica_key:
            raise ValueError("KILN_REPLICA_URLS needs KILN_REPLICA_KEY, the key the remote replicas were started with")
        return self

    @property
    def replica_urls(self) -> list[str]:
        return [url.rstrip("/") for url in self._split(self.kiln_replica_urls)]

    @field_validator("kiln_trusted_proxies")
    @classmethod
    def _proxies(cls, value: str) -> str:
        TrustedProxies(value)  # raises ValueError naming the bad address
        return value

    @property
    def cors_origins(self) -> list[str]:
        return self._split(self.kiln_cors_origins)


def load_settings(**overrides) -> ServeSettings:
    """Settings from the environment and $KILN_SERVE_CONFIG, with `overrides` (the command line) on top."""
    path = os.environ.get(CONFIG_ENV)
    if path and not Path(path).is_file():
        raise KilnError(f"{CONFIG_ENV}={path}: settings file not found")
    try:
        return ServeSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]).upper()
        message = str(err["msg"]).removeprefix("Value error, ")
        raise KilnError(f"serve setting {where}: {message}" if where else f"serve settings: {message}") from None
