"""The operator as a policy point: what a FastSlowRun or TaskStream may ask of the cluster.

The operator creates trainer Jobs with its own permissions, so everything a spec names that
reaches the Job (image, ServiceAccount, Secrets, scheduling, GPUs, queue) or the trainer's
config (storage URIs, the reflector's endpoint and key variable) is checked here against the
platform's allow-lists before anything is created. Pure functions, no I/O:

    Policy              the allow-lists (the chart's `policy:` values, FST_POLICY)
    tenant_root         s3://bucket/prefix + namespace -> s3://bucket/prefix/<namespace>/
    check_trainer       spec.trainer          -> [Violation]
    check_config        spec.config           -> [Violation]
    check_run           a FastSlowRun's spec  -> [Violation]
    check_stream        a TaskStream          -> [Violation] (trainer + every stage, merged)
    check_storage_uri   one s3:// URI against the tenant root (and the shared model prefixes)
    format_violations   violations -> one message for the resource's status
    enforce             raises PolicyViolation (a ValueError) when there are violations

Rules:

- Every allow-list is a list of strings; the entry "*" allows anything, and an empty list
  allows nothing but leaving the field out (the operator's default then applies).
- Images: an entry ending in "/" allows every repository under it (`ghcr.io/fastslow/`); any
  other entry is one repository, with any tag or digest (`ghcr.io/fastslow/trainer`). The image
  must be a valid reference, so no string trick can change the registry.
- Tolerations use the `kubectl taint` syntax: `key[=value][:effect]`. An entry without a value
  allows any value (operator Exists), one without an effect any effect. A toleration without a
  key tolerates EVERY taint (nodes reserved for others, control-plane nodes): only "*" allows it.
- nodeSelector entries are `key` (any value) or `key=value`.
- GPUs: `maxGpus` bounds what a run asks for in all, spec.trainer.nodes x gpusPerNode (the
  deprecated `gpus`, or the default 1, standing for gpusPerNode).
- Storage: with a tenant root (FST_TENANT_PREFIX), every s3:// URI a spec names must lie
  strictly below `s3://<bucket>/<prefix>/<namespace>/`: checkpoints and data (read/write);
  model.name, model.reference and a local reflector's model may also lie below a shared
  read-only prefix (`sharedPrefixes`). URIs are compared by path segment after a strict
  parse that refuses what could be read differently by S3, MinIO or the trainer: `.`, `..`
  and empty segments, `%`, `\\`, `?`, `#`, spaces and non-ASCII characters, another bucket.
  "Strictly below" because a data path is listed as a key prefix: `s3://b/tenants/team-a`
  would also list `tenants/team-ab/...`. Without a tenant root, s3:// URIs are not checked.
- Other model sources: hub ids (`HuggingFaceTB/SmolLM2-135M-Instruct`) and the built-in alias
  are allowed; other URI schemes are refused. Local paths are allowed (a trainer pod can only
  read its image's files and its own scratch volume) except the kernel and runtime filesystems
  /proc, /sys, /dev, /run and /var/run: `/proc/self/environ` holds the pod's credentials. The
  same holds for every string in task.params (relative paths resolve from /scratch, the pod's
  working folder). Symbolic links are not followed (the operator cannot see the image).
- The reflector's baseUrl and apiKeyEnv are checked when its kind is openai (the only kind that
  uses them): the trainer sends the variable's value to that URL, so both are allow-listed.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel, to_snake

from fst.config import TrainConfig
from fst.k8s.api import STAGE_SECTIONS, FastSlowRunSpec, TaskStream, Toleration, TrainerSpec
from fst.plan import stage_config, stage_run_name
from fst.schema import DNS_LABEL

ANY = "*"
EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
POD_HOME = "/scratch"  # the trainer's working folder and HOME (builders.SCRATCH)
DENIED_LOCAL_ROOTS = ("/proc", "/sys", "/dev", "/run", "/var/run")
SHOWN = 5  # allow-list entries quoted in a message

DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
_QUALIFIED_KEY = r"([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
_LABEL_VALUE = r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_NODE_SELECTOR_ENTRY = re.compile(rf"^{_QUALIFIED_KEY}(={_LABEL_VALUE})?$")
_TOLERATION_ENTRY = re.compile(
    rf"^(?P<key>{_QUALIFIED_KEY})(=(?P<value>{_LABEL_VALUE}))?(:(?P<effect>{'|'.join(EFFECTS)}))?$"
)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
# An image reference (the distribution/reference grammar): [domain[:port]/]path[:tag][@digest].
_DOMAIN_PART = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE = re.compile(
    rf"^(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*(?::[0-9]+)?/)?{_PATH_PART}(?:/{_PATH_PART})*"
    r"(?::[\w][\w.-]{0,127})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$"
)


# ----------------------------------------------------------------------------- violations


@dataclass(frozen=True)
class Violation:
    """One refused field: `field` as the user writes it (spec.trainer.tolerations[0]) and
    what is wrong and what is allowed."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def format_violations(violations: Sequence[Violation], limit: int = 3) -> str:
    """One line for a status condition and an Event: the first `limit` violations and how
    many more there are."""
    if not violations:
        return ""
    shown = "; ".join(str(v) for v in violations[:limit])
    more = len(violations) - limit
    head = f"refused by the operator's policy ({len(violations)} problem(s)): "
    return head + shown + (f"; and {more} more" if more > 0 else "")


class PolicyViolation(ValueError):
    """A spec the policy refuses. A ValueError, so the operator's handlers report it like an
    invalid spec (phase Invalid, a Warning event)."""

    def __init__(self, violations: Sequence[Violation]) -> None:
        self.violations = list(violations)
        super().__init__(format_violations(self.violations))


def enforce(violations: Sequence[Violation]) -> None:
    """Raise PolicyViolation if there is any violation."""
    if violations:
        raise PolicyViolation(violations)


# ----------------------------------------------------------------------------- the policy


def _listed(entries: Sequence[str], what: str = "") -> str:
    """The allow-list as a message shows it."""
    if ANY in entries:
        return "any"
    if not entries:
        return f"none{what}"
    shown = ", ".join(entries[:SHOWN])
    return shown + (f" (and {len(entries) - SHOWN} more)" if len(entries) > SHOWN else "")


def _entries(v: Sequence[str], pattern: re.Pattern[str] | str, what: str) -> Sequence[str]:
    regex = re.compile(pattern) if isinstance(pattern, str) else pattern
    for entry in v:
        if entry != ANY and not regex.match(entry):
            raise ValueError(f"{entry!r} is not {what} (or {ANY!r} for any)")
    return v


class Policy(BaseModel):
    """What specs may ask for. The defaults are the chart's (helm/fastslow/values.yaml
    `policy:`): the project's trainer images, GPU scheduling, no other ServiceAccounts,
    Secrets or priority classes, no openai reflector endpoint."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True
    )

    images: tuple[str, ...] = Field(
        ("ghcr.io/fastslow/",),
        description="Image prefixes ending in '/', or repositories (any tag or digest).",
    )
    image_pull_policies: tuple[Literal["Always", "IfNotPresent", "Never"], ...] = Field(
        ("IfNotPresent", "Always"), description="Never would run any image a node happens to have."
    )
    service_accounts: tuple[str, ...] = Field(
        (), description="ServiceAccounts a spec may name; [] = none (the namespace's default)."
    )
    secrets: tuple[str, ...] = Field(
        (),
        description="Secrets a spec may name as s3Secret or databaseSecret. Settings.policy "
        "adds the one a run gets when it names none (with tenancy the namespace's tenant "
        "Secret, else the operator's defaults).",
    )
    node_selectors: tuple[str, ...] = Field(
        (
            "nvidia.com/gpu.present",
            "nvidia.com/gpu.product",
            "kubernetes.io/arch",
            "node.kubernetes.io/instance-type",
        ),
        description="nodeSelector entries: 'key' (any value) or 'key=value'.",
    )
    tolerations: tuple[str, ...] = Field(
        ("nvidia.com/gpu:NoSchedule",),
        description="key[=value][:effect]; a keyless (tolerate-everything) toleration needs '*'.",
    )
    priority_classes: tuple[str, ...] = Field((), description="[] = none (the cluster default).")
    max_gpus: int = Field(
        8, ge=0, le=64, description="nvidia.com/gpu per run: spec.trainer.nodes x gpusPerNode."
    )
    require_queue: bool = Field(False, description="Every run must name a Kueue queue.")
    queues: tuple[str, ...] = Field(
        (ANY,), description="Kueue LocalQueues a spec may name (they are namespaced)."
    )
    reflector_endpoints: tuple[str, ...] = Field(
        (),
        description="URL prefixes (http/https) an openai reflector's baseUrl may start with; "
        "[] = no openai reflector.",
    )
    reflector_key_envs: tuple[str, ...] = Field(
        ("OPENAI_API_KEY",), description="Variables an openai reflector's apiKeyEnv may name."
    )
    shared_prefixes: tuple[str, ...] = Field(
        (),
        description="s3:// prefixes every namespace may READ models from (model.name, "
        "model.reference), besides its own tenant root.",
    )

    @field_validator("images")
    @classmethod
    def _images(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for entry in v:
            if entry == ANY:
                continue
            if entry.endswith("/"):  # a prefix: what follows it is a repository path
                ok = bool(_IMAGE.match(entry + "x"))
            else:  # one repository, without tag or digest
                last = entry.rpartition("/")[2]
                ok = bool(_IMAGE.match(entry)) and ":" not in last and "@" not in entry
            if not ok:
                raise ValueError(
                    f"{entry!r}: expected a registry/path prefix ending in '/' or a repository "
                    "without tag (e.g. ghcr.io/fastslow/ or ghcr.io/fastslow/trainer)"
                )
        return v

    @field_validator("service_accounts", "secrets", "priority_classes", "queues")
    @classmethod
    def _names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_entries(v, DNS_SUBDOMAIN, "a Kubernetes object name"))

    @field_validator("node_selectors")
    @classmethod
    def _node_selectors(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_entries(v, _NODE_SELECTOR_ENTRY, "a label key or key=value"))

    @field_validator("tolerations")
    @classmethod
    def _tolerations(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_entries(v, _TOLERATION_ENTRY, "key[=value][:effect]"))

    @field_validator("reflector_key_envs")
    @classmethod
    def _key_envs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_entries(v, _ENV_NAME, "an environment variable name"))

    @field_validator("reflector_endpoints")
    @classmethod
    def _endpoints(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for entry in v:
            if entry != ANY:
                _parse_url(entry)  # ValueError names the problem
        return v

    @field_validator("shared_prefixes")
    @classmethod
    def _shared(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(str(parse_s3(entry)) for entry in v)  # canonical: ends in '/'

    @model_validator(mode="after")
    def _coherent(self) -> Policy:
        if self.require_queue and not self.queues:
            raise ValueError("requireQueue with no allowed queues would refuse every run")
        return self

    @classmethod
    def unrestricted(cls) -> Policy:
        """Everything allowed (development clusters, the test harness): FST_POLICY =
        Policy.unrestricted().to_env()."""
        return cls(
            images=(ANY,),
            image_pull_policies=PULL_POLICIES,
            service_accounts=(ANY,),
            secrets=(ANY,),
            node_selectors=(ANY,),
            tolerations=(ANY,),
            priority_classes=(ANY,),
            max_gpus=64,
            queues=(ANY,),
            reflector_endpoints=(ANY,),
            reflector_key_envs=(ANY,),
        )

    def to_env(self) -> str:
        """The FST_POLICY value of this policy (JSON, camelCase keys)."""
        return self.model_dump_json(by_alias=True)

    def with_secrets(self, names: Sequence[str]) -> Policy:
        """This policy also allowing `names` (the operator's default Secrets)."""
        extra = tuple(n for n in names if n and n not in self.secrets)
        return self if not extra else self.model_copy(update={"secrets": self.secrets + extra})


# ----------------------------------------------------------------------------- storage


@dataclass(frozen=True)
class S3Location:
    """A canonical s3:// location: the bucket and the key's path segments."""

    bucket: str
    key: tuple[str, ...]

    def __str__(self) -> str:
        return f"s3://{self.bucket}/" + "".join(f"{part}/" for part in self.key)

    def contains(self, other: S3Location) -> bool:
        """Whether `other` lies strictly below this location (whole segments)."""
        n = len(self.key)
        return other.bucket == self.bucket and len(other.key) > n and other.key[:n] == self.key


def parse_s3(uri: str) -> S3Location:
    """Parse an s3:// URI strictly; ValueError says what is refused. One trailing '/' is
    allowed; everything that S3, MinIO or the trainer could read differently is not."""
    if not uri.startswith("s3://"):
        raise ValueError(f"{uri!r}: expected s3://bucket/path (lowercase scheme)")
    rest = uri[len("s3://") :]
    bad = sorted({c for c in rest if c in "%\\?#" or not 0x21 <= ord(c) <= 0x7E})
    if bad:
        raise ValueError(
            f"{uri!r}: characters {''.join(bad)!r} are not allowed (no percent-encoding, "
            "backslashes, query, fragment, spaces or non-ASCII)"
        )
    bucket, _, path = rest.partition("/")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise ValueError(f"{uri!r}: {bucket!r} is not a bucket name")
    path = path.removesuffix("/")
    key = tuple(path.split("/")) if path else ()
    if any(part in ("", ".", "..") for part in key):
        raise ValueError(f"{uri!r}: empty, '.' and '..' path segments are not allowed")
    return S3Location(bucket, key)


def tenant_root(prefix: str, namespace: str) -> str:
    """The namespace's storage root: `s3://bucket/prefix` + `team-a` ->
    `s3://bucket/prefix/team-a/` (always ending in '/'). ValueError for a bad prefix or
    namespace."""
    if not re.match(DNS_LABEL, namespace):
        raise ValueError(f"{namespace!r} is not a namespace name")
    loc = parse_s3(prefix)
    return str(S3Location(loc.bucket, (*loc.key, namespace)))


StorageKind = Literal["data", "model"]


def check_storage_uri(
    uri: str, root: str, kind: StorageKind = "data", shared: Sequence[str] = ()
) -> str | None:
    """Why `uri` is refused, or None: it must lie strictly below `root` (data and
    checkpoints) or, for kind "model", below one of the `shared` read-only prefixes."""
    try:
        loc = parse_s3(uri)
    except ValueError as e:
        return str(e)
    tenant = parse_s3(root)
    if tenant.contains(loc):
        return None
    prefixes = [parse_s3(p) for p in shared] if kind == "model" else []
    if any(p.contains(loc) for p in prefixes):
        return None
    where = f"below {tenant}" + (
        f" or a shared model prefix ({_listed([str(p) for p in prefixes])})" if prefixes else ""
    )
    return f"{uri!r} is outside this namespace's storage: s3:// URIs must be {where}"


def _local_path_problem(value: str) -> str | None:
    """A local path in the pod must not read the kernel's or runtime's files."""
    if value.startswith("~"):
        if value != "~" and not value.startswith("~/"):
            return f"{value!r}: '~user' paths are not allowed in a cluster"
        value = POD_HOME + value[1:]
    path = posixpath.normpath(posixpath.join(POD_HOME, value))
    path = "/" + path.lstrip("/")  # normpath keeps a leading '//'
    for denied in DENIED_LOCAL_ROOTS:
        if path == denied or path.startswith(denied + "/"):
            return (
                f"{value!r} reads {denied} in the trainer pod (its credentials and the "
                "kernel's files): use an s3:// URI or a file of the image"
            )
    return None


def _source_problem(value: str, root: str | None, shared: Sequence[str]) -> str | None:
    """A model source: s3:// (tenant root or shared), a hub id, the alias, a local path."""
    scheme = _SCHEME.match(value)
    if scheme and scheme.group(1).lower() == "s3":
        return check_storage_uri(value, root, "model", shared) if root else None
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value):
        return f"{value!r}: only s3:// URIs, hub ids and local paths are allowed"
    return _local_path_problem(value)


def _data_problem(value: str, root: str | None) -> str | None:
    """A data or checkpoint location: s3:// under the tenant root, or a safe local path."""
    scheme = _SCHEME.match(value)
    if scheme and scheme.group(1).lower() == "s3":
        return check_storage_uri(value, root, "data") if root else None
    return _local_path_problem(value)


# ----------------------------------------------------------------------------- trainer


def _name_allowed(name: str, entries: Sequence[str]) -> bool:
    return ANY in entries or name in entries


def image_allowed(image: str, entries: Sequence[str]) -> bool:
    """Whether `image` (a valid reference) is allowed by the image entries."""
    if ANY in entries:
        return True
    if not _IMAGE.match(image):
        return False
    for entry in entries:
        if entry.endswith("/"):
            if image.startswith(entry) and len(image) > len(entry):
                return True
        elif image == entry or image.startswith((entry + ":", entry + "@")):
            return True
    return False


def _toleration_text(t: Toleration) -> str:
    key = t.key or "<every key>"
    value = f"={t.value}" if (t.operator or "Equal") == "Equal" and t.value is not None else ""
    op = " (Exists)" if t.operator == "Exists" else ""
    return f"{key}{value}:{t.effect or '<every effect>'}{op}"


def toleration_allowed(t: Toleration, entries: Sequence[str]) -> bool:
    """Whether the toleration is covered by one entry (`key[=value][:effect]`)."""
    if ANY in entries:
        return True
    if not t.key:  # matches every taint
        return False
    exists = t.operator == "Exists"
    for entry in entries:
        m = _TOLERATION_ENTRY.match(entry)
        if m is None or m["key"] != t.key:
            continue
        if m["value"] is not None and (exists or (t.value or "") != m["value"]):
            continue
        if m["effect"] is not None and t.effect != m["effect"]:
            continue
        return True
    return False


def check_trainer(
    trainer: TrainerSpec,
    policy: Policy,
    tenant_root: str | None = None,
    where: str = "spec.trainer",
) -> list[Violation]:
    """Every field of `spec.trainer` that reaches the Job, against the policy."""
    out: list[Violation] = []

    def refuse(field: str, message: str) -> None:
        out.append(Violation(f"{where}.{field}", message))

    if not image_allowed(trainer.image, policy.images):
        why = "" if _IMAGE.match(trainer.image) else " (not a valid image reference)"
        refuse("image", f"{trainer.image!r} is not allowed{why}; allowed: {_listed(policy.images)}")
    if trainer.image_pull_policy not in policy.image_pull_policies:
        refuse(
            "imagePullPolicy",
            f"{trainer.image_pull_policy} is not allowed; allowed: "
            f"{_listed(policy.image_pull_policies)}",
        )
    if trainer.service_account_name and not _name_allowed(
        trainer.service_account_name, policy.service_accounts
    ):
        refuse(
            "serviceAccountName",
            f"{trainer.service_account_name!r} is not allowed; allowed: "
            f"{_listed(policy.service_accounts, ' (leave it out: the namespace default)')}",
        )
    secrets = _listed(policy.secrets, " (leave it out: the operator's default)")
    if trainer.s3_secret and not _name_allowed(trainer.s3_secret, policy.secrets):
        refuse("s3Secret", f"Secret {trainer.s3_secret!r} is not allowed; allowed: {secrets}")
    db = trainer.database_secret
    if db is not None and not _name_allowed(db.name, policy.secrets):
        refuse("databaseSecret.name", f"Secret {db.name!r} is not allowed; allowed: {secrets}")
    for key, value in trainer.node_selector.items():
        if not (
            ANY in policy.node_selectors
            or key in policy.node_selectors
            or f"{key}={value}" in policy.node_selectors
        ):
            refuse(
                f"nodeSelector[{key}]",
                f"{key}={value} is not allowed; allowed: {_listed(policy.node_selectors)}",
            )
    for i, t in enumerate(trainer.tolerations):
        if not toleration_allowed(t, policy.tolerations):
            every = (
                " (a toleration without a key tolerates every taint: name the taint's key)"
                if not t.key
                else ""
            )
            refuse(
                f"tolerations[{i}]",
                f"tolerating {_toleration_text(t)} is not allowed{every}; allowed: "
                f"{_listed(policy.tolerations)}",
            )
    if trainer.priority_class_name and not _name_allowed(
        trainer.priority_class_name, policy.priority_classes
    ):
        refuse(
            "priorityClassName",
            f"{trainer.priority_class_name!r} is not allowed; allowed: "
            f"{_listed(policy.priority_classes, ' (leave it out: the cluster default)')}",
        )
    if trainer.total_gpus > policy.max_gpus:
        # Named as the user wrote it: the deprecated `gpus`, else gpusPerNode (or its default).
        field = "gpus" if trainer.gpus is not None else "gpusPerNode"
        refuse(
            field,
            f"{trainer.total_gpus} GPUs per run ({trainer.nodes} node(s) x {trainer.node_gpus}); "
            f"at most {policy.max_gpus} are allowed",
        )
    if trainer.queue_name is None:
        if policy.require_queue:
            refuse(
                "queueName",
                "required: every run goes through a Kueue queue; allowed: "
                f"{_listed(policy.queues)}",
            )
    elif not _name_allowed(trainer.queue_name, policy.queues):
        refuse(
            "queueName",
            f"{trainer.queue_name!r} is not allowed; allowed: {_listed(policy.queues)}",
        )
    if trainer.checkpoint_uri is not None and tenant_root is not None:
        problem = check_storage_uri(trainer.checkpoint_uri, tenant_root, "data")
        if problem:
            refuse("checkpointUri", problem)
    return out


# ----------------------------------------------------------------------------- config


def _parse_url(url: str) -> tuple[str, str, int, tuple[str, ...]]:
    """(scheme, host, port, path segments) of an http(s) URL; ValueError when it has user
    info, a query, a fragment, percent-encoding or dot segments (tricks on a prefix match)."""
    if any(c in "%\\" or not 0x21 <= ord(c) <= 0x7E for c in url):
        raise ValueError(f"{url!r}: no percent-encoding, backslashes, spaces or non-ASCII")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"{url!r}: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r}: expected http(s)://host[:port]/path")
    if "@" in parts.netloc or parts.query or parts.fragment or "?" in url or "#" in url:
        raise ValueError(f"{url!r}: no user info, query or fragment")
    path = parts.path.removesuffix("/").removeprefix("/")
    segments = tuple(path.split("/")) if path else ()
    if any(s in ("", ".", "..") for s in segments):
        raise ValueError(f"{url!r}: empty, '.' and '..' path segments are not allowed")
    default = 443 if parts.scheme == "https" else 80
    return parts.scheme, parts.hostname.lower(), port or default, segments


def endpoint_allowed(url: str, entries: Sequence[str]) -> bool:
    """Whether `url` is one of the allowed endpoints or below one (same scheme, host, port,
    and whole path segments)."""
    if ANY in entries:
        return True
    try:
        scheme, host, port, path = _parse_url(url)
    except ValueError:
        return False
    for entry in entries:
        e_scheme, e_host, e_port, e_path = _parse_url(entry)
        if (scheme, host, port) == (e_scheme, e_host, e_port) and path[: len(e_path)] == e_path:
            return True
    return False


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """(field path, string) of every string inside `value` (task params)."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _strings(v, f"{path}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from _strings(v, f"{path}[{i}]")


def _config_problems(
    cfg: TrainConfig, policy: Policy, root: str | None
) -> Iterator[tuple[str, str]]:
    """(field path inside the config, message) of every refused value."""
    shared = policy.shared_prefixes
    for field, value in (("model.name", cfg.model.name), ("model.reference", cfg.model.reference)):
        if value is not None and (problem := _source_problem(value, root, shared)):
            yield field, problem
    if cfg.checkpoint.uri is not None and (problem := _data_problem(cfg.checkpoint.uri, root)):
        yield "checkpoint.uri", problem
    for field, value in _strings(cfg.task.params, "task.params"):
        if problem := _data_problem(value, root):
            yield field, problem
    r = cfg.fast.reflector
    if r.kind == "local" and r.model and (problem := _source_problem(r.model, root, shared)):
        yield "fast.reflector.model", problem
    if r.kind == "openai":
        if r.base_url is not None and not endpoint_allowed(r.base_url, policy.reflector_endpoints):
            allowed = _listed(policy.reflector_endpoints, " (use reflector kind digest or local)")
            yield "fast.reflector.baseUrl", f"{r.base_url!r} is not allowed; allowed: {allowed}"
        if not _name_allowed(r.api_key_env, policy.reflector_key_envs):
            yield (
                "fast.reflector.apiKeyEnv",
                f"{r.api_key_env!r} is not allowed (its value is sent to baseUrl); allowed: "
                f"{_listed(policy.reflector_key_envs)}",
            )


def check_config(
    cfg: TrainConfig, policy: Policy, tenant_root: str | None, where: str = "spec.config"
) -> list[Violation]:
    """The storage URIs, local paths and reflector settings of a run's config.
    `tenant_root` None: s3:// URIs are not checked (no FST_TENANT_PREFIX)."""
    return [Violation(f"{where}.{f}", m) for f, m in _config_problems(cfg, policy, tenant_root)]


def check_run(spec: FastSlowRunSpec, policy: Policy, tenant_root: str | None) -> list[Violation]:
    """A FastSlowRun's spec: its trainer and its config."""
    return check_trainer(spec.trainer, policy, tenant_root) + check_config(
        spec.config, policy, tenant_root
    )


# ----------------------------------------------------------------------------- streams


def _sets(section: Any, parts: Sequence[str]) -> bool:
    """Whether a stage's settings (`StageSpec.overrides()`: what it sets) hold the field at
    `parts` (camelCase, or snake_case as a user may write it)."""
    node = section
    for part in parts:
        if not isinstance(node, Mapping):
            return False
        key = next((k for k in (part, to_snake(part)) if k in node), None)
        if key is None:
            return False
        node = node[key]
    return True


def _stream_field(stream: TaskStream, index: int, field: str) -> str:
    """Where the user wrote a merged config's field: spec.model, the stage (which wins), or
    the stream's defaults (also for a field nobody wrote: that is where to set it)."""
    parts = field.split(".")
    if parts[0] == "model":
        return f"spec.{field}"
    if parts[0] in STAGE_SECTIONS and not _sets(stream.spec.stages[index].overrides(), parts):
        return f"spec.defaults.{field}"
    return f"spec.stages[{index}].{field}"


def check_stream(stream: TaskStream, policy: Policy, tenant_root: str | None) -> list[Violation]:
    """A TaskStream: its trainer (copied into every stage's run) and every stage's config as
    the planner merges it (defaults < stage), each violation once, named where it was
    written (spec.model.name, spec.defaults.fast.reflector.baseUrl,
    spec.stages[1].task.params.path). Run it BEFORE planning: the planner lists the stages'
    s3:// data with the operator's own credentials."""
    out = check_trainer(stream.spec.trainer, policy, tenant_root)
    seen = {(v.field, v.message) for v in out}
    for i, stage in enumerate(stream.spec.stages):
        name = stage_run_name(stream.metadata.name, stage.name, 1)
        try:
            cfg = stage_config(stream, stage, run_name=name)
        except ValidationError:
            continue  # fst.plan.check_stages reports it
        for field, message in _config_problems(cfg, policy, tenant_root):
            v = Violation(_stream_field(stream, i, field), message)
            if (v.field, v.message) not in seen:
                seen.add((v.field, v.message))
                out.append(v)
    return out
