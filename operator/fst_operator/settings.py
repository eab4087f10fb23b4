"""The operator's settings: environment variables (the Helm chart's values set them)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from fst_operator.builders import Defaults


def _float(name: str, default: float) -> float:
    value = os.environ.get(name)
    try:
        return float(value) if value else default
    except ValueError:
        raise SystemExit(f"{name}={value!r}: expected a number") from None


@dataclass(frozen=True)
class Settings:
    namespaces: list[str] = field(default_factory=list)  # empty: all namespaces
    # Where the operator reads runs' progress (step, reward, KL, checkpoint, population):
    # the platform's database, the one the trainers write to.
    database_url: str | None = None
    defaults: Defaults = field(default_factory=Defaults)
    progress_interval: float = 10.0  # seconds between progress reads of a running run
    stream_poll_interval: float = 30.0  # seconds between data-source checks of a stream
    watch_server_timeout: float = 300.0  # kopf watch requests are re-opened this often
    event_level: str = "INFO"  # lowest level of kopf's own Kubernetes Events
    metrics_port: int = 9090  # Prometheus /metrics; 0 = off
    liveness_port: int = 8080  # /healthz
    workers: int = 20  # threads for the (blocking) handlers

    @staticmethod
    def from_env() -> Settings:
        env = os.environ
        database_secret = env.get("FST_DEFAULT_DATABASE_SECRET")  # name/key
        secret = None
        if database_secret:
            name, _, key = database_secret.partition("/")
            secret = {"name": name, "key": key or "url"}
        return Settings(
            namespaces=[n for n in env.get("FST_WATCH_NAMESPACES", "").split(",") if n],
            database_url=env.get("FST_DATABASE_URL") or None,
            defaults=Defaults(
                checkpoint_prefix=env.get("FST_DEFAULT_CHECKPOINT_URI") or None,
                database_secret=secret,
                s3_secret=env.get("FST_DEFAULT_S3_SECRET") or None,
            ),
            progress_interval=_float("FST_PROGRESS_INTERVAL", 10.0),
            stream_poll_interval=_float("FST_STREAM_POLL_INTERVAL", 30.0),
            watch_server_timeout=_float("FST_WATCH_TIMEOUT", 300.0),
            event_level=env.get("FST_EVENT_LEVEL", "INFO").upper(),
            metrics_port=int(_float("FST_METRICS_PORT", 9090)),
            liveness_port=int(_float("FST_LIVENESS_PORT", 8080)),
            workers=int(_float("FST_OPERATOR_WORKERS", 20)),
        )

    def describe(self, namespaces: list[str] | None = None) -> str:
        shown = {
            "namespaces": namespaces or self.namespaces or "all",
            "database": "set" if self.database_url else "none (status shows no progress)",
            "defaults": self.defaults.__dict__,
            "progressInterval": self.progress_interval,
            "streamPollInterval": self.stream_poll_interval,
            "metricsPort": self.metrics_port,
            "livenessPort": self.liveness_port,
        }
        return json.dumps(shown, default=str)
