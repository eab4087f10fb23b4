"""Run state that is not a checkpoint: runs and their writer lease, task-stream stages, prompt
population versions, metrics and events. SQLite on one machine, Postgres in a cluster.

The schema is owned by the Alembic migrations in fst/store/migrations (shipped inside the
package); `RunDB.upgrade()` applies them. The mappings below must match the latest migration.

One writer per run: `acquire_run` takes a lease with a single conditional UPDATE (free, or its
holder's heartbeat expired), which the database serializes, so two trainers on one run get a
`RunLockedError` instead of interleaving their writes.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple, cast

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import CursorResult, Dialect, Engine, Result
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from fst.fast.population import PromptRecord

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
DEFAULT_LEASE_S = 60.0
MIGRATION_LOCK = 0x46535431  # any fixed number; "FST1"


class RunLockedError(RuntimeError):
    """Another live process holds the run's writer lease."""


class UnknownRunError(KeyError):
    pass


def now() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend. SQLite has no time zones: store naive
    UTC there (its text form then sorts and compares correctly), and re-attach UTC on read."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSONType = JSON().with_variant(JSONB(), "postgresql")


# Constraint names fixed by convention, identical on every backend: migrations can name them.
NAMING = {
    "pk": "pk_%(table_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    mode: Mapped[str] = mapped_column(String(16))
    config: Mapped[dict[str, Any]] = mapped_column(JSONType)
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    writer: Mapped[str | None] = mapped_column(String(200))  # lease token of the live writer
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Stage(Base):
    __tablename__ = "stages"
    __table_args__ = (UniqueConstraint("stream", "index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    stream: Mapped[str] = mapped_column(String(63))
    index: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(63))
    run_name: Mapped[str] = mapped_column(String(63))
    status: Mapped[str] = mapped_column(String(16))
    checkpoint_uri: Mapped[str | None] = mapped_column(Text)
    population_version: Mapped[int | None] = mapped_column(Integer)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The data it trained on (sha256 of a file, or of an S3 prefix's ETags), and the
    # promotion gate (fst/promote.py): the decision with every number, the bundle if promoted.
    data_version: Mapped[str | None] = mapped_column(Text)
    promoted: Mapped[bool | None] = mapped_column(Boolean)
    gate: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    bundle_uri: Mapped[str | None] = mapped_column(Text)


class GateScore(Base):
    """A greedy score the promotion gate measured (fst/gate.py), by fst.gate.score_key."""

    __tablename__ = "gate_scores"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    pass_rate: Mapped[float] = mapped_column(Float)
    n: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class PromptPopulation(Base):
    """One version of a run's prompt population; versions are only ever appended (and cut
    back on resume)."""

    __tablename__ = "prompt_populations"
    __table_args__ = (UniqueConstraint("run_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    round: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    members: Mapped[list[dict[str, Any]]] = mapped_column(JSONType)


class Metric(Base):
    """One value per (run, step, name); the primary key is also the (run, step) index."""

    __tablename__ = "metrics"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    value: Mapped[float | None] = mapped_column(Float)  # NULL for NaN/inf (SQLite cannot)


class Event(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    kind: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)


# ----------------------------------------------------------------------------- plain results


@dataclass(frozen=True)
class RunProgress:
    step: int
    reward: float | None
    kl: float | None
    checkpoint_uri: str | None
    population_version: int | None
    population: list[str]
    last_error: str | None


class ProgressMarker(NamedTuple):
    """What moves when a run's progress can have changed (RunDB.progress_markers)."""

    step: int | None
    event_id: int | None
    population_version: int | None


@dataclass(frozen=True)
class PopulationVersion:
    version: int
    round: int
    step: int
    created_at: datetime
    members: list[PromptRecord]


@dataclass(frozen=True)
class StageInfo:
    stream: str
    index: int
    name: str
    run_name: str
    status: str
    checkpoint_uri: str | None
    population_version: int | None
    started_at: datetime | None
    finished_at: datetime | None
    data_version: str | None = None
    promoted: bool | None = None
    gate: dict[str, Any] | None = None
    bundle_uri: str | None = None


def member_dict(record: PromptRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "text": record.text,
        "parents": list(record.parents),
        "born_round": record.born_round,
        "val_scores": dict(record.val_scores),
        "scored_round": record.scored_round,
    }


# ----------------------------------------------------------------------------- connection


def database_url(url: str | None = None, default_path: Path | str | None = None) -> str:
    """The SQLAlchemy URL to use: `url`, else $FST_DATABASE_URL, else SQLite at `default_path`.

    A plain path means a SQLite file; `postgresql://` picks the psycopg 3 driver."""
    value = url or os.environ.get("FST_DATABASE_URL") or (str(default_path) if default_path else "")
    if not value:
        raise ValueError("no database: pass a URL or path, or set FST_DATABASE_URL")
    if "://" not in value:
        return f"sqlite:///{Path(value).expanduser().resolve()}"
    for plain in ("postgresql://", "postgres://"):
        if value.startswith(plain):
            return "postgresql+psycopg://" + value[len(plain) :]
    return value


def _sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL; None for another database or an in-memory one."""
    if not url.startswith("sqlite"):
        return None
    path = url.split("///", 1)[-1]
    return Path(path) if path and path != ":memory:" else None


@contextlib.contextmanager
def _sqlite_migration_lock(url: str) -> Iterator[None]:
    """SQLite's counterpart of PostgreSQL's advisory lock: runs on one machine starting
    together on a new database file (the learning bench starts two) would otherwise both find
    no tables and both create them ("table runs already exists"). A lock on a file beside the
    database makes one migrate while the others wait, then find nothing to do."""
    path = _sqlite_file(url)
    if path is None:
        yield
        return
    with open(path.with_name(path.name + ".migrate-lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def make_engine(url: str) -> Engine:
    url = database_url(url)
    if url.startswith("sqlite"):
        path = _sqlite_file(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # Enforce foreign keys (off by default in SQLite); WAL lets readers run beside the writer.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.close()


# ----------------------------------------------------------------------------- API


class RunDB:
    """The run database. Every method is one short transaction."""

    def __init__(self, url: str) -> None:
        self.url = database_url(url)
        self.engine = make_engine(self.url)
        self.session = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> RunDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ schema

    def alembic_config(self) -> Any:
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        # ConfigParser interpolation: a literal % in a password must be doubled.
        cfg.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        return cfg

    def upgrade(self, revision: str = "head") -> None:
        """Bring the schema to `revision` with the packaged migrations."""
        self._migrate("upgrade", revision)

    def downgrade(self, revision: str = "base") -> None:
        self._migrate("downgrade", revision)

    def _migrate(self, direction: str, revision: str) -> None:
        from alembic import command

        cfg = self.alembic_config()
        with _sqlite_migration_lock(self.url), self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # Trainer pods starting together all call upgrade(): one migrates, the others
                # wait here (the lock ends with the transaction), then find nothing to do.
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
            cfg.attributes["connection"] = conn
            getattr(command, direction)(cfg, revision)

    def schema_revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    # ------------------------------------------------------------------ runs and leases

    def acquire_run(
        self,
        name: str,
        mode: str,
        config: dict[str, Any],
        lease_s: float = DEFAULT_LEASE_S,
        wait_s: float = 0.0,
    ) -> Lease:
        """Become the run's only writer (creating the run if new). Raises RunLockedError if
        another writer holds it and its last heartbeat is younger than `lease_s`.

        With `wait_s`, a held lease is watched for up to that long: a writer that heartbeats
        meanwhile is alive (refused at once); one that stays silent died without releasing
        (SIGKILL, a lost node) and its lease is taken over once it expires. That is what the
        next attempt of a crashed trainer pod needs: it starts seconds after the crash."""
        deadline = time.monotonic() + wait_s
        first_beat: datetime | None = None
        while True:
            try:
                return self._acquire_once(name, mode, config, lease_s)
            except RunLockedError:
                beat = self._heartbeat(name)
                first_beat = first_beat or beat
                left = deadline - time.monotonic()
                if beat is None or beat != first_beat or left <= 0:
                    raise
                age = (now() - beat).total_seconds()
                log.info(
                    "run %r: its writer has been silent for %.0f s; waiting for its lease to "
                    "expire (%.0f s)",
                    name,
                    age,
                    max(lease_s - age, 0.0),
                )
                time.sleep(min(5.0, left, max(lease_s - age, 0.5)))

    def _heartbeat(self, name: str) -> datetime | None:
        with self.session() as s:
            beat: datetime | None = s.scalar(select(Run.heartbeat_at).where(Run.name == name))
        return beat

    def _acquire_once(self, name: str, mode: str, config: dict[str, Any], lease_s: float) -> Lease:
        self._ensure_run(name, mode, config)
        token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        t = now()
        stale = self._dead_local_writer(name)
        with self.session.begin() as s:
            taken = _rowcount(
                s.execute(
                    update(Run)
                    .where(Run.name == name)
                    .where(
                        or_(
                            Run.writer.is_(None),
                            Run.heartbeat_at.is_(None),
                            Run.heartbeat_at < t - timedelta(seconds=lease_s),
                            Run.writer == stale,
                        )
                    )
                    .values(
                        writer=token,
                        heartbeat_at=t,
                        status="running",
                        mode=mode,
                        config=config,
                        updated_at=t,
                    )
                )
            )
        if taken != 1:
            raise RunLockedError(self._locked_message(name, lease_s))
        return Lease(self, name, token, lease_s)

    def _ensure_run(self, name: str, mode: str, config: dict[str, Any]) -> None:
        t = now()
        try:
            with self.session.begin() as s:
                if s.scalar(select(Run.id).where(Run.name == name)) is None:
                    s.add(
                        Run(
                            name=name,
                            mode=mode,
                            config=config,
                            status="created",
                            created_at=t,
                            updated_at=t,
                        )
                    )
        except IntegrityError:
            pass  # created concurrently by another process: fine, it exists now

    def _dead_local_writer(self, name: str) -> str | None:
        """The run's writer token if that writer was a process on THIS host that no longer
        exists (killed before it could release): its lease need not be waited out. Writers on
        other hosts (other pods) are only ever taken over once their heartbeat expires."""
        with self.session() as s:
            writer = s.scalar(select(Run.writer).where(Run.name == name))
        if not writer:
            return None
        host, _, rest = writer.partition(":")
        pid = rest.partition(":")[0]
        if host != socket.gethostname() or not pid.isdigit():
            return None
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return writer
        except PermissionError:
            return None  # alive, owned by another user
        return None

    def _locked_message(self, name: str, lease_s: float) -> str:
        with self.session() as s:
            run = s.scalar(select(Run).where(Run.name == name))
        if run is None or run.heartbeat_at is None:
            return f"run {name!r} is held by another writer"
        age = (now() - run.heartbeat_at).total_seconds()
        return (
            f"run {name!r} is being written by {run.writer} (last heartbeat {age:.0f}s ago; "
            f"the lease expires {max(lease_s - age, 0):.0f}s after its heartbeats stop). "
            "Stop that trainer first: two writers on one run are refused."
        )

    def run_info(self, name: str) -> dict[str, Any] | None:
        with self.session() as s:
            run = s.scalar(select(Run).where(Run.name == name))
            if run is None:
                return None
            cols = ("name", "mode", "config", "status", "created_at", "updated_at", "writer")
            return {c: getattr(run, c) for c in (*cols, "heartbeat_at")}

    def _run_id(self, s: Session, name: str) -> int:
        run_id = s.scalar(select(Run.id).where(Run.name == name))
        if run_id is None:
            raise UnknownRunError(f"no run named {name!r} in the database")
        return run_id

    # ------------------------------------------------------------------ metrics

    def log_metrics(self, run: str, step: int, values: dict[str, Any]) -> None:
        """Record the numeric entries of `values` for `step` (others are skipped)."""
        with self.session.begin() as s:
            run_id = self._run_id(s, run)
            for name, value in values.items():
                if isinstance(value, bool | int | float):
                    v = float(value)
                    s.merge(Metric(run_id=run_id, step=step, name=name, value=_finite(v)))

    def metrics(self, run: str) -> dict[int, dict[str, float | None]]:
        """step -> {name: value}, steps ascending."""
        with self.session() as s:
            rows = s.execute(
                select(Metric.step, Metric.name, Metric.value)
                .where(Metric.run_id == self._run_id(s, run))
                .order_by(Metric.step, Metric.name)
            ).all()
        out: dict[int, dict[str, float | None]] = {}
        for step, name, value in rows:
            out.setdefault(step, {})[name] = value
        return out

    def truncate_after(self, run: str, step: int) -> None:
        """Forget metrics and population versions of steps after `step` (a resume from the
        checkpoint of `step` will redo them). Events are history and stay."""
        with self.session.begin() as s:
            run_id = self._run_id(s, run)
            s.execute(delete(Metric).where(Metric.run_id == run_id, Metric.step > step))
            s.execute(
                delete(PromptPopulation).where(
                    PromptPopulation.run_id == run_id, PromptPopulation.step > step
                )
            )

    # ------------------------------------------------------------------ populations

    def save_population(self, run: str, round: int, step: int, members: list[PromptRecord]) -> int:
        """Append a new version of the run's population; return its version number."""
        with self.session.begin() as s:
            run_id = self._run_id(s, run)
            last = s.scalar(
                select(func.max(PromptPopulation.version)).where(PromptPopulation.run_id == run_id)
            )
            version = (last or 0) + 1
            s.add(
                PromptPopulation(
                    run_id=run_id,
                    version=version,
                    round=round,
                    step=step,
                    created_at=now(),
                    members=[member_dict(m) for m in members],
                )
            )
        return version

    def populations(self, run: str) -> list[PopulationVersion]:
        with self.session() as s:
            rows = s.scalars(
                select(PromptPopulation)
                .where(PromptPopulation.run_id == self._run_id(s, run))
                .order_by(PromptPopulation.version)
            ).all()
        return [_population(r) for r in rows]

    def latest_population(self, run: str) -> PopulationVersion | None:
        with self.session() as s:
            row = s.scalar(
                select(PromptPopulation)
                .where(PromptPopulation.run_id == self._run_id(s, run))
                .order_by(PromptPopulation.version.desc())
                .limit(1)
            )
        return _population(row) if row is not None else None

    # ------------------------------------------------------------------ events

    def log_event(self, run: str, kind: str, message: str) -> None:
        with self.session.begin() as s:
            s.add(Event(run_id=self._run_id(s, run), at=now(), kind=kind, message=message))

    def events(self, run: str) -> list[tuple[datetime, str, str]]:
        with self.session() as s:
            rows = s.execute(
                select(Event.at, Event.kind, Event.message)
                .where(Event.run_id == self._run_id(s, run))
                .order_by(Event.id)
            ).all()
        return [(at, kind, message) for at, kind, message in rows]

    def progress_markers(self, runs: Iterable[str]) -> dict[str, ProgressMarker]:
        """For each of `runs` that exists: its last metric step, last event id and last
        population version. The marker moves whenever anything `progress` reports can have
        changed, so a poller of many runs asks this one query and reads `progress` only for
        the runs whose marker moved."""
        names = list(runs)
        markers: dict[str, ProgressMarker] = {}
        # Chunks keep the IN list under SQLite's bound-parameter limit.
        for start in range(0, len(names), 500):
            chunk = names[start : start + 500]
            query = select(
                Run.name,
                select(func.max(Metric.step)).where(Metric.run_id == Run.id).scalar_subquery(),
                select(func.max(Event.id)).where(Event.run_id == Run.id).scalar_subquery(),
                select(func.max(PromptPopulation.version))
                .where(PromptPopulation.run_id == Run.id)
                .scalar_subquery(),
            ).where(Run.name.in_(chunk))
            with self.session() as s:
                for name, step, event, version in s.execute(query):
                    markers[name] = ProgressMarker(step, event, version)
        return markers

    def progress(self, run: str) -> RunProgress | None:
        """What a run's status shows: its last step's reward, the last KL measured, the last
        checkpoint and population, the last error. Four small indexed queries, cheap enough
        for an operator to poll for every running run."""
        with self.session() as s:
            run_id = s.scalar(select(Run.id).where(Run.name == run))
            if run_id is None:
                return None
            step = s.scalar(select(func.max(Metric.step)).where(Metric.run_id == run_id))
            values: dict[str, float | None] = {}
            if step is not None:
                rows = s.execute(
                    select(Metric.name, Metric.value).where(
                        Metric.run_id == run_id,
                        Metric.step == step,
                        Metric.name.in_(("reward_mean", "kl")),
                    )
                ).all()
                values = {name: value for name, value in rows}
            kl = values.get("kl")
            if kl is None:
                kl = s.scalar(
                    select(Metric.value)
                    .where(Metric.run_id == run_id, Metric.name == "kl")
                    .order_by(Metric.step.desc())
                    .limit(1)
                )

            def last_event(kind: str) -> str | None:
                return s.scalar(
                    select(Event.message)
                    .where(Event.run_id == run_id, Event.kind == kind)
                    .order_by(Event.id.desc())
                    .limit(1)
                )

            population = s.scalar(
                select(PromptPopulation)
                .where(PromptPopulation.run_id == run_id)
                .order_by(PromptPopulation.version.desc())
                .limit(1)
            )
            return RunProgress(
                step=step or 0,
                reward=values.get("reward_mean"),
                kl=kl,
                checkpoint_uri=last_event("checkpoint"),
                population_version=population.version if population else None,
                population=[m["text"] for m in population.members] if population else [],
                last_error=last_event("error"),
            )

    # ------------------------------------------------------------------ stages

    def start_stage(self, stream: str, index: int, name: str, run_name: str) -> None:
        """Mark stage `index` of `stream` running (creating it, or restarting it)."""
        with self.session.begin() as s:
            stage = s.scalar(select(Stage).where(Stage.stream == stream, Stage.index == index))
            if stage is None:
                stage = Stage(stream=stream, index=index)
                s.add(stage)
            stage.name, stage.run_name, stage.status = name, run_name, "running"
            stage.started_at, stage.finished_at = now(), None

    def finish_stage(
        self,
        stream: str,
        index: int,
        status: str = "succeeded",
        checkpoint_uri: str | None = None,
        population_version: int | None = None,
        *,
        data_version: str | None = None,
        gate: dict[str, Any] | None = None,
        bundle_uri: str | None = None,
    ) -> None:
        """Record how stage `index` ended; `gate` is the promotion gate's decision
        (fst.promote.GateDecision as JSON), `bundle_uri` its bundle when promoted."""
        with self.session.begin() as s:
            stage = s.scalar(select(Stage).where(Stage.stream == stream, Stage.index == index))
            if stage is None:
                raise KeyError(f"stream {stream!r} has no stage {index}")
            stage.status, stage.finished_at = status, now()
            stage.checkpoint_uri = checkpoint_uri
            stage.population_version = population_version
            stage.data_version = data_version
            stage.gate = gate
            stage.promoted = None if gate is None else bool(gate.get("promoted"))
            stage.bundle_uri = bundle_uri

    def gate_score(self, key: str) -> tuple[float, int] | None:
        """(pass rate, n) of a score the gate measured, or None."""
        with self.session() as s:
            row = s.get(GateScore, key)
            return None if row is None else (row.pass_rate, row.n)

    def save_gate_score(self, key: str, pass_rate: float, n: int) -> None:
        """Keep a measured score; the same key measured again (greedy: the same number) is
        kept as first written."""
        with self.session.begin() as s:
            if s.get(GateScore, key) is None:
                s.add(GateScore(key=key, pass_rate=pass_rate, n=n, created_at=now()))

    def stages(self, stream: str) -> list[StageInfo]:
        with self.session() as s:
            rows = s.scalars(
                select(Stage).where(Stage.stream == stream).order_by(Stage.index)
            ).all()
        return [
            StageInfo(
                r.stream,
                r.index,
                r.name,
                r.run_name,
                r.status,
                r.checkpoint_uri,
                r.population_version,
                r.started_at,
                r.finished_at,
                r.data_version,
                r.promoted,
                r.gate,
                r.bundle_uri,
            )
            for r in rows
        ]


class Lease:
    """The writer lease on one run.

    Keep it alive with `heartbeat()` (or `keep_alive()`, a background thread) more often than
    the lease length, call `check()` before every write the run makes, `release()` when done.

    The lease is LOST, for good, when
      - a heartbeat finds another writer in the row (ours expired and was taken over), or
      - no heartbeat has succeeded for longer than the lease length (`lease_s`): another
        trainer may by then have taken the run over, since the database shows our heartbeat
        as expired. A heartbeat that fails (database unreachable, locked...) is logged and
        retried at the next beat until then.
    Times are this process's monotonic clock, counted from the START of the last successful
    heartbeat (the time it wrote), so we give the run up no later than a competitor may take
    it, clock skew between the hosts aside.
    """

    def __init__(self, db: RunDB, run: str, token: str, lease_s: float = DEFAULT_LEASE_S) -> None:
        self.db, self.run, self.token, self.lease_s = db, run, token, lease_s
        self.lost: str | None = None  # why the lease was lost, if it was
        self._confirmed = time.monotonic()  # the lease was just taken
        self._lost_lock = threading.Lock()  # the heartbeat thread and the loop both may lose it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def heartbeat(self) -> None:
        """Refresh the lease; RunLockedError if someone took it over (ours had expired). A
        database error propagates (the lease is then neither refreshed nor known to be lost)."""
        started = time.monotonic()
        with self.db.session.begin() as s:
            t = now()
            n = _rowcount(
                s.execute(
                    update(Run)
                    .where(Run.name == self.run, Run.writer == self.token)
                    .values(heartbeat_at=t, updated_at=t)
                )
            )
        if n != 1:
            self._lose(f"run {self.run!r}: lease {self.token} was lost (it expired and was taken)")
            raise RunLockedError(self.lost)
        self._confirmed = started

    def check(self) -> None:
        """Raise RunLockedError if the lease is lost, or has not been confirmed for longer than
        its length (call before every write: metrics, populations, checkpoints)."""
        if self.lost is None:
            silent = time.monotonic() - self._confirmed
            if silent > self.lease_s:
                self._lose(
                    f"run {self.run!r}: lease {self.token} was lost: no heartbeat succeeded "
                    f"for {silent:.0f}s, longer than the lease ({self.lease_s:.0f}s), so "
                    "another trainer may have taken the run over"
                )
        if self.lost is not None:
            raise RunLockedError(self.lost)

    def keep_alive(self, every_s: float | None = None) -> None:
        """Heartbeat in a background thread every `every_s` (default: a quarter of the lease,
        so three beats may fail before the lease is lost)."""
        interval = self.lease_s / 4 if every_s is None else every_s

        def beat() -> None:
            while not self._stop.wait(interval):
                try:
                    self.heartbeat()
                except RunLockedError:
                    return  # lost (logged by _lose); check() stops the run
                except Exception as e:
                    # A database blip: say so, and try again at the next beat.
                    log.warning(
                        "run %r: lease heartbeat failed (%s: %s); retrying in %.1fs",
                        self.run,
                        type(e).__name__,
                        e,
                        interval,
                    )
                try:
                    self.check()  # gives up once the lease length has passed unconfirmed
                except RunLockedError:
                    return

        self._thread = threading.Thread(target=beat, name=f"lease-{self.run}", daemon=True)
        self._thread.start()

    def _lose(self, why: str) -> None:
        with self._lost_lock:
            if self.lost is not None:
                return  # lost already: the first reason stands
            # Log before publishing: whoever sees `lost` set can rely on the error being logged.
            log.error("%s; the run stops at its next step and writes nothing more", why)
            self.lost = why

    def release(self, status: str = "stopped") -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self.db.session.begin() as s:
            s.execute(
                update(Run)
                .where(Run.name == self.run, Run.writer == self.token)
                .values(writer=None, heartbeat_at=None, status=status, updated_at=now())
            )

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.release("failed" if exc_type else "stopped")


def _rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE matched. Session.execute returns a CursorResult for DML statements; its
    static type is the general Result, which has no rowcount."""
    return cast(CursorResult[Any], result).rowcount


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _population(row: PromptPopulation) -> PopulationVersion:
    return PopulationVersion(
        row.version,
        row.round,
        row.step,
        row.created_at,
        [PromptRecord.from_dict(m) for m in row.members],
    )
