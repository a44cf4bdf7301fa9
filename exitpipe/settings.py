"""Settings from flags, then ``EXITPIPE_*`` environment variables, then defaults (DESIGN 6)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from producers.connection import parse_urls
from producers.errors import redact as redact  # one redaction for the whole project
from producers.spool import default_spool
from schemas.topology import Topology, topology


class Settings(BaseSettings):
    """Every setting of exitpipe; the README's table is generated from this model."""

    model_config = SettingsConfigDict(env_prefix="EXITPIPE_", extra="ignore")

    amqp_url: str = Field(
        "amqp://guest:guest@127.0.0.1:5672/%2F",
        description="Broker URL (amqp:// or amqps://), or a comma-separated list of the nodes of"
        " one cluster, each with its own credentials and TLS: every connection tries them in"
        " turn and fails over (a comma inside a URL is written %2C).",
    )
    amqp_ca_file: Path | None = Field(
        None, description="CA bundle that verifies the broker's certificate for amqps:// URLs."
    )
    namespace: str = Field(
        "exitpipe",
        pattern=r"^[A-Za-z0-9._-]{1,64}$",
        description="Prefix of every exchange and queue, so deployments can share a broker.",
    )
    store: str = Field(
        "sqlite:///exitpipe.db",
        description="Job store: sqlite:///relative.db, sqlite:////abs.db or postgresql://...",
    )
    policy: str = Field("nvflare-2.8", description="Built-in policy name or a TOML policy file.")
    spool_dir: Path = Field(
        default_factory=default_spool,
        description="Where report/launch keep events the broker could not take.",
    )
    heartbeat: int = Field(
        30, ge=1, le=600, description="AMQP heartbeat in seconds (0 would disable it: refused)."
    )
    retry_seconds: float = Field(
        30.0, gt=0, description="Total time a publish or connect is retried before giving up."
    )
    prefetch: int = Field(500, ge=1, le=65535, description="Unacked deliveries per consumer.")
    batch_size: int = Field(
        200, ge=1, description="Most events the job-state consumer commits in one transaction."
    )
    batch_wait_ms: float = Field(
        0.0,
        ge=0,
        description=(
            "Longest the job-state consumer waits to fill a batch. 0 takes what has arrived:"
            " one event at a trickle, full batches under a flood (they gather while the last"
            " one commits)."
        ),
    )
    delivery_limit: int = Field(
        5, ge=1, description="Deliveries before a work-queue message is dead-lettered."
    )
    archive_max_age: str = Field(
        "7D", pattern=r"^\d+[YMDhms]$", description="Archive stream retention by age."
    )
    archive_max_bytes: int = Field(
        1_000_000_000, ge=1, description="Archive stream retention by size, in bytes."
    )
    quorum_size: int | None = Field(
        None,
        ge=0,
        le=99,
        description="Replicas of each quorum queue when it is created. Unset: one per URL of"
        " EXITPIPE_AMQP_URL, at most 3 (for a single URL, the broker's default: every node);"
        " 0: always the broker's default.",
    )
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Port of /metrics and /healthz (off when unset)."
    )
    log_format: Literal["text", "json"] = Field("text", description="Daemon log lines.")
    require_site_user: bool = Field(
        False,
        description="Classifier: dead-letter exit events not sent by a site user"
        " `<ns>-site-<site>` (set where every launcher has its own broker user).",
    )

    web_token: SecretStr | None = Field(
        None,
        description="Token the web dashboard asks for (Authorization: Bearer, or ?token= once);"
        " required to bind `exitpipe web` to anything but loopback.",
    )
    web_metrics: str | None = Field(
        None,
        description="Comma-separated /metrics URLs of the daemons, for the dashboard's health"
        " page (http://127.0.0.1:9101/metrics,...).",
    )

    @field_validator("amqp_url")
    @classmethod
    def _amqp_urls(cls, value: str) -> str:
        parse_urls(value)  # a bad list is refused here, at start, with the reason
        return value


def topology_of(settings: Settings) -> Topology:
    """The namespace's topology with the configured limits and retention."""
    return topology(
        settings.namespace,
        delivery_limit=settings.delivery_limit,
        archive_max_age=settings.archive_max_age,
        archive_max_bytes=settings.archive_max_bytes,
        quorum_size=quorum_size(settings),
    )


def quorum_size(settings: Settings) -> int | None:
    """Replicas of each quorum queue; None leaves it to the broker (every node)."""
    if settings.quorum_size is not None:
        return settings.quorum_size or None
    nodes = len(parse_urls(settings.amqp_url))
    return min(nodes, 3) if nodes > 1 else None
