"""The operator's settings: environment variables (the Helm chart's values set them).

pydantic-settings reads and validates them; a bad value stops the operator at start with the
variable's name, never a traceback (`Settings.from_env`).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from fst_operator.builders import Defaults
from fst_operator.policy import Policy, tenant_root


def _env(name: str) -> Any:
    return Field(None, validation_alias=AliasChoices(name))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    # Empty: all namespaces (cluster-wide). Comma-separated: FST_WATCH_NAMESPACES=team-a,team-b
    namespaces: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias=AliasChoices("FST_WATCH_NAMESPACES")
    )
    # Where the operator reads runs' progress (step, reward, KL, checkpoint, population):
    # the platform's database, the one the trainers write to.
    database_url: str | None = _env("FST_DATABASE_URL")
    checkpoint_prefix: str | None = _env("FST_DEFAULT_CHECKPOINT_URI")
    database_secret: str | None = Field(
        None,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?(/[-._a-zA-Z0-9]+)?$",
        validation_alias=AliasChoices("FST_DEFAULT_DATABASE_SECRET"),
        description="name/key of the Secret with the database URL (key default: url)",
    )
    s3_secret: str | None = _env("FST_DEFAULT_S3_SECRET")
    # What specs may ask for (fst_operator/policy.py): one JSON object with the chart's
    # `policy:` keys, e.g. FST_POLICY='{"images": ["ghcr.io/fastslow/"], "maxGpus": 8}'.
    # Unset or {}: the built-in defaults (the chart's); keys left out keep their default.
    policy_config: Annotated[Policy, NoDecode] = Field(
        default_factory=Policy, validation_alias=AliasChoices("FST_POLICY")
    )
    # s3://bucket/prefix: each namespace's storage is s3://bucket/prefix/<namespace>/, and
    # every s3:// URI a spec names must lie below it. Unset: storage URIs are not checked.
    tenant_prefix: str | None = _env("FST_TENANT_PREFIX")
    progress_interval: float = Field(
        10.0, gt=0, validation_alias=AliasChoices("FST_PROGRESS_INTERVAL")
    )  # seconds between progress reads of a running run
    stream_poll_interval: float = Field(
        30.0, gt=0, validation_alias=AliasChoices("FST_STREAM_POLL_INTERVAL")
    )  # seconds between data-source checks of a stream
    watch_server_timeout: float = Field(
        300.0, gt=0, validation_alias=AliasChoices("FST_WATCH_TIMEOUT")
    )  # kopf's watch requests are re-opened this often
    # The lowest level of kopf's own Kubernetes Events (the operator's Events, phases, retries,
    # invalid specs, are always posted). Not INFO: kopf's "Handler '...' succeeded" Events
    # say only that a handler ran, which tells a user nothing (when the runs' handler was one
    # of kopf's create handlers, two Events per new run; their cost was lost in the noise at
    # 1000 runs: docs/performance.md, round 2).
    event_level: str = Field(
        "WARNING",
        pattern=r"^(DEBUG|INFO|WARNING|ERROR)$",
        validation_alias=AliasChoices("FST_EVENT_LEVEL"),
    )
    metrics_port: int = Field(
        9090, ge=0, le=65535, validation_alias=AliasChoices("FST_METRICS_PORT")
    )  # Prometheus /metrics; 0 = off
    liveness_port: int = Field(
        8080, ge=0, le=65535, validation_alias=AliasChoices("FST_LIVENESS_PORT")
    )  # /healthz
    workers: int = Field(
        20, gt=0, validation_alias=AliasChoices("FST_OPERATOR_WORKERS")
    )  # threads for the (blocking) handlers
    api_connections: int = Field(
        32, gt=0, validation_alias=AliasChoices("FST_API_CONNECTIONS")
    )  # kopf's requests in flight at once (its patches, Events), besides its watch streams

    @field_validator("namespaces", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return [n.strip() for n in v.split(",") if n.strip()] if isinstance(v, str) else v

    @field_validator("event_level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @field_validator(
        "database_url",
        "checkpoint_prefix",
        "database_secret",
        "s3_secret",
        "tenant_prefix",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, v: Any) -> Any:
        return v or None  # the chart passes "" for an unset default

    @field_validator("policy_config", mode="before")
    @classmethod
    def _json(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        if not v.strip():
            return {}
        try:
            return json.loads(v)
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON: {e}") from None

    @field_validator("tenant_prefix")
    @classmethod
    def _tenant_prefix(cls, v: str | None) -> str | None:
        if v is not None:
            tenant_root(v, "namespace")  # ValueError names the problem
        return v

    @property
    def defaults(self) -> Defaults:
        secret = None
        if self.database_secret:
            name, _, key = self.database_secret.partition("/")
            secret = {"name": name, "key": key or "url"}
        return Defaults(
            self.checkpoint_prefix, secret, self.s3_secret, tenant_prefix=self.tenant_prefix
        )

    @property
    def policy(self) -> Policy:
        """FST_POLICY, also allowing by name the Secrets a run gets when it names none (naming
        them gives nothing more): the namespace's tenant Secret with FST_TENANT_PREFIX, else
        the operator's default Secrets. With tenancy the default Secrets (the root
        credentials) are NOT allowed unless FST_POLICY lists them."""
        if self.tenant_prefix:
            return self.policy_config.with_secrets([self.defaults.tenant_secret])
        database = self.database_secret.partition("/")[0] if self.database_secret else None
        return self.policy_config.with_secrets([n for n in (self.s3_secret, database) if n])

    def tenant_root(self, namespace: str) -> str | None:
        """The namespace's storage root (s3://bucket/prefix/<namespace>/), or None when
        FST_TENANT_PREFIX is unset (storage URIs are then not checked)."""
        return self.defaults.tenant_root(namespace)

    @staticmethod
    def from_env() -> Settings:
        try:
            return Settings()
        except ValidationError as e:
            fields = Settings.model_fields
            problems = []
            for err in e.errors():
                name = str(err["loc"][0]) if err["loc"] else "?"
                alias = fields[name].validation_alias if name in fields else None
                env = str(alias.choices[0]) if isinstance(alias, AliasChoices) else name
                # Inside a JSON value (FST_POLICY): the key, e.g. FST_POLICY.maxGpus.
                env += "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"][1:])
                problems.append(f"{env}={err.get('input')!r}: {err['msg']}")
            raise SystemExit("operator settings: " + "; ".join(problems)) from None

    def describe(self, namespaces: list[str] | None = None) -> str:
        shown = {
            "namespaces": namespaces or self.namespaces or "all",
            "database": "set" if self.database_url else "none (status shows no progress)",
            "defaults": self.defaults.__dict__,
            "progressInterval": self.progress_interval,
            "streamPollInterval": self.stream_poll_interval,
            "metricsPort": self.metrics_port,
            "livenessPort": self.liveness_port,
            "policy": self.policy.model_dump(mode="json", by_alias=True),
            "tenantPrefix": self.tenant_prefix or "none (storage URIs are not checked)",
        }
        return json.dumps(shown, default=str)
