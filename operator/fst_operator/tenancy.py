"""One customer per namespace: its own S3 user and its own database role, made by the operator.

Every namespace the operator serves is a tenant. Before the first trainer of a namespace starts,
`TenantProvisioner.ensure(namespace)` makes (idempotently, in this order):

    S3        a MinIO user `fst-<ns>` whose policy allows objects under `<prefix>/<ns>/` only
              (read, write, delete, list with that prefix), plus read-only access to the shared
              prefixes (base models) the chart allow-lists;
    database  a login role `fst_<ns>` that owns one schema of the same name, and nothing else:
              no access to other schemas, `search_path` set to its own, a connection limit;
              the schema's tables are created by running the migrations AS that role;
    Secret    `fastslow-tenant` in the namespace: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
              AWS_SECRET_ACCESS_KEY, AWS_REGION and FST_DATABASE_URL of that tenant. Trainer
              pods get it as `envFrom`.

The root/owner credentials stay in the operator's own namespace and process. If the Secret
already exists its keys are re-applied (a restarted operator, a store restored from backup),
so the Secret is the single source of the tenant's password; delete it to rotate.

Why a role + schema per namespace rather than row-level security or the operator as the only
writer: trainers write metrics, prompt versions, events and their lease at every step, so the
operator as sole writer would put every step behind an API; row-level security would leave one
`runs` table whose unique run names, lease rows and sequences are shared, so one tenant could
still learn of or squat another's names. A schema per role shares nothing but the server, and
the privilege check is PostgreSQL's own. On AWS the same shape is an IAM role per namespace
(IRSA) with a policy on `arn:aws:s3:::<bucket>/<prefix>/<ns>/*`; docs/security.md says how.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url

from fst.store.db import RunDB
from fst.store.s3 import parse_endpoint, parse_s3_uri
from fst_operator.builders import TENANT_SECRET

log = logging.getLogger("fst_operator.tenancy")

SECRET_NAME = TENANT_SECRET
ROLE_CONNECTION_LIMIT = 32  # a trainer holds a few; a tenant cannot exhaust the server's slots


# ----------------------------------------------------------------------------- pure: names


@dataclass(frozen=True)
class Tenant:
    """The names of one namespace's identities and places. Namespaces are DNS labels (a-z, 0-9,
    '-'; no '_' and no '.'), so every mapping below is one-to-one."""

    namespace: str
    s3_user: str  # MinIO access key
    s3_policy: str  # MinIO canned policy
    db_role: str  # PostgreSQL role AND schema
    bucket: str
    prefix: str  # key prefix inside the bucket, ends with '/'

    @property
    def root(self) -> str:
        """`s3://bucket/<prefix>/<ns>/`: every object the tenant may write lives under it."""
        return f"s3://{self.bucket}/{self.prefix}"


def tenant(namespace: str, tenant_prefix: str) -> Tenant:
    """The tenant of `namespace` under `tenant_prefix` (s3://bucket/prefix)."""
    bucket, base = parse_s3_uri(tenant_prefix)
    role = "fst_" + namespace.replace("-", "_")
    if len(role) > 63:  # PostgreSQL silently cuts identifiers at 63 bytes: cut with a hash
        role = role[:54] + "_" + hashlib.sha256(namespace.encode()).hexdigest()[:8]
    return Tenant(
        namespace=namespace,
        s3_user=f"fst-{namespace}",
        s3_policy=f"fst-tenant-{namespace}",
        db_role=role,
        bucket=bucket,
        prefix=f"{base}/{namespace}/" if base else f"{namespace}/",
    )


def s3_policy(t: Tenant, shared: list[str]) -> dict[str, Any]:
    """The IAM policy document of a tenant: its own prefix read-write, the shared prefixes
    (s3:// URIs) read-only. ListBucket is allowed only with a prefix inside those places."""
    own = f"arn:aws:s3:::{t.bucket}/{t.prefix}*"
    statements: list[dict[str, Any]] = [
        {
            "Effect": "Allow",
            "Action": [
                "s3:GetObject",
                "s3:PutObject",
                "s3:DeleteObject",
                "s3:AbortMultipartUpload",
                "s3:ListMultipartUploadParts",
            ],
            "Resource": [own],
        },
        {
            "Effect": "Allow",
            "Action": ["s3:ListBucket"],
            "Resource": [f"arn:aws:s3:::{t.bucket}"],
            "Condition": {"StringLike": {"s3:prefix": [f"{t.prefix}*"]}},
        },
    ]
    for uri in shared:
        bucket, key = parse_s3_uri(uri)
        key = f"{key}/" if key else ""
        statements.append(
            {
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": [f"arn:aws:s3:::{bucket}/{key}*"],
            }
        )
        statements.append(
            {
                "Effect": "Allow",
                "Action": ["s3:ListBucket"],
                "Resource": [f"arn:aws:s3:::{bucket}"],
                "Condition": {"StringLike": {"s3:prefix": [f"{key}*"]}},
            }
        )
    return {"Version": "2012-10-17", "Statement": statements}


def tenant_database_url(owner_url: str, role: str, password: str) -> str:
    """The owner's URL (same host, port, database, options) with the tenant's login."""
    url = make_url(owner_url).set(username=role, password=password)
    return url.render_as_string(hide_password=False)


def schema_url(owner_url: str, schema: str) -> str:
    """The owner's URL reading one tenant's schema (libpq `options=-csearch_path=...`)."""
    url = make_url(owner_url)
    query = dict(url.query)
    query["options"] = f"-csearch_path={schema}"
    return url.set(query=query).render_as_string(hide_password=False)


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str
    db_password: str


def new_credentials(t: Tenant) -> Credentials:
    # URL-safe and free of '%', '@', ':', '/': they go into a database URL unquoted.
    return Credentials(t.s3_user, secrets.token_hex(20), secrets.token_hex(20))


def secret_object(
    t: Tenant, creds: Credentials, s3_endpoint: str, region: str, database_url: str | None
) -> dict[str, Any]:
    """The tenant's Secret (`stringData`): exactly the environment a trainer needs."""
    data = {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": creds.access_key,
        "AWS_SECRET_ACCESS_KEY": creds.secret_key,
        "AWS_REGION": region,
        "FST_DB_PASSWORD": creds.db_password,
    }
    if database_url:
        data["FST_DATABASE_URL"] = database_url
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": SECRET_NAME,
            "namespace": t.namespace,
            "labels": {
                "app.kubernetes.io/managed-by": "fastslow-operator",
                "fastslow.io/tenant": t.namespace,
            },
        },
        "type": "Opaque",
        "stringData": data,
    }


def credentials_from_secret(t: Tenant, data: dict[str, str]) -> Credentials | None:
    """The credentials an existing tenant Secret holds (decoded), None if it is not whole."""
    access, secret, password = (
        data.get("AWS_ACCESS_KEY_ID"),
        data.get("AWS_SECRET_ACCESS_KEY"),
        data.get("FST_DB_PASSWORD"),
    )
    if access != t.s3_user or not secret or not password:
        return None
    return Credentials(access, secret, password)


# ----------------------------------------------------------------------------- I/O


class TenantError(RuntimeError):
    """A tenant's credentials could not be made (the stores refused or are down)."""


class TenantProvisioner:
    """Makes each namespace's S3 user and database role with the operator's admin logins.

    `s3_env` holds the admin's AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (the
    operator's own environment); `owner_url` is the database owner's URL (a role allowed to
    CREATE ROLE and CREATE SCHEMA), or None when the trainers get no database."""

    def __init__(
        self,
        tenant_prefix: str,
        s3_env: dict[str, str],
        owner_url: str | None,
        shared_prefixes: list[str] | None = None,
    ) -> None:
        self.tenant_prefix = tenant_prefix
        self.s3_env = s3_env
        self.owner_url = owner_url
        self.shared = list(shared_prefixes or [])
        self._lock = threading.Lock()
        self._done: set[str] = set()

    def tenant(self, namespace: str) -> Tenant:
        return tenant(namespace, self.tenant_prefix)

    def ensure(
        self,
        namespace: str,
        read_secret: Any,
        create_secret: Any,
    ) -> Tenant:
        """Idempotent: the tenant's S3 user, database role and Secret exist and agree.
        `read_secret(ns, name) -> dict | None` (decoded data) and `create_secret(obj)` are the
        Kubernetes calls (the handlers pass kube.py's)."""
        t = self.tenant(namespace)
        with self._lock:
            if namespace in self._done:
                return t
            existing = read_secret(namespace, SECRET_NAME)
            creds = credentials_from_secret(t, existing) if existing is not None else None
            fresh = creds is None
            if creds is None:
                creds = new_credentials(t)
            self.ensure_s3_user(t, creds)
            url = self.ensure_database_role(t, creds) if self.owner_url else None
            if fresh:
                endpoint = self.s3_env.get("AWS_ENDPOINT_URL", "")
                region = self.s3_env.get("AWS_REGION") or "us-east-1"
                create_secret(secret_object(t, creds, endpoint, region, url), replace=existing)
            self._done.add(namespace)
            log.info("tenant %s: S3 user %s, database role %s", namespace, t.s3_user, t.db_role)
            return t

    # ---- S3 (MinIO's admin API through the minio SDK)

    def _admin(self) -> Any:
        from minio import MinioAdmin
        from minio.credentials import StaticProvider

        endpoint = parse_endpoint(self.s3_env.get("AWS_ENDPOINT_URL", ""))
        return MinioAdmin(
            endpoint=endpoint.host,
            credentials=StaticProvider(
                self.s3_env.get("AWS_ACCESS_KEY_ID", ""),
                self.s3_env.get("AWS_SECRET_ACCESS_KEY", ""),
            ),
            region=self.s3_env.get("AWS_REGION") or "us-east-1",
            secure=endpoint.secure,
        )

    def ensure_s3_user(self, t: Tenant, creds: Credentials) -> None:
        admin = self._admin()
        try:
            admin.policy_add(t.s3_policy, policy=s3_policy(t, self.shared))
            admin.user_add(creds.access_key, creds.secret_key)  # creates or sets the secret
            admin.policy_set(t.s3_policy, user=creds.access_key)
        except Exception as e:
            host = urlsplit(self.s3_env.get("AWS_ENDPOINT_URL", "")).netloc
            raise TenantError(f"S3 user {t.s3_user} on {host}: {e}") from e

    # ---- PostgreSQL

    def ensure_database_role(self, t: Tenant, creds: Credentials) -> str:
        """The role and its schema, then the schema's tables made by the role itself."""
        import psycopg
        from psycopg import sql

        assert self.owner_url is not None
        url = make_url(self.owner_url)
        dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
        role, password = sql.Identifier(t.db_role), sql.Literal(creds.db_password)
        database = sql.Identifier(url.database or "postgres")
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                exists = conn.execute(
                    "SELECT 1 FROM pg_roles WHERE rolname = %s", (t.db_role,)
                ).fetchone()
                verb = "ALTER" if exists else "CREATE"
                conn.execute(
                    sql.SQL(
                        verb + " ROLE {} WITH LOGIN PASSWORD {} NOSUPERUSER NOCREATEDB "
                        "NOCREATEROLE NOINHERIT NOBYPASSRLS CONNECTION LIMIT {}"
                    ).format(role, password, sql.Literal(ROLE_CONNECTION_LIMIT))
                )
                # The owner must be a member to hand the schema to the role (not as superuser).
                conn.execute(sql.SQL("GRANT {} TO CURRENT_USER").format(role))
                conn.execute(
                    sql.SQL("CREATE SCHEMA IF NOT EXISTS {} AUTHORIZATION {}").format(role, role)
                )
                conn.execute(sql.SQL("ALTER ROLE {} SET search_path = {}").format(role, role))
                # Nobody but a schema's owner may use it; the database is not open to PUBLIC.
                conn.execute(sql.SQL("REVOKE ALL ON SCHEMA {} FROM PUBLIC").format(role))
                conn.execute(sql.SQL("REVOKE CREATE ON SCHEMA public FROM PUBLIC"))
                conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(database))
                conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(database, role))
        except psycopg.Error as e:
            raise TenantError(f"database role {t.db_role}: {str(e).strip()}") from e
        tenant_url = tenant_database_url(self.owner_url, t.db_role, creds.db_password)
        with RunDB(tenant_url) as db:  # the tables belong to the tenant, not to the owner
            db.upgrade()
        return tenant_url
