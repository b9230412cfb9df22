"""The artifact registry: one SQLite file that knows every artifact the stages made, its lineage and its releases.

One row per artifact, keyed by the sha256 of its bytes (a data set by its content fingerprint), with its kind,
region, headline metrics, producing run, parents (an edges table) and where its file lies. Registering is
content-addressed and idempotent (the same bytes twice are one row) and atomic: an artifact, its locations and
its edges are written in one transaction, so a writer killed half way leaves all of them or none. The promotion
history is append-only (triggers refuse an UPDATE or DELETE of it).

SQLite in WAL mode lets readers work beside a writer; writers take the lock up front (``BEGIN IMMEDIATE``) and
wait up to :data:`BUSY_TIMEOUT_S` for each other, so concurrent stages never lose a row.

Where it lives: ``$FMTRANSFER_REGISTRY`` (``off`` disables it), else ``$FMTRANSFER_CACHE/registry.sqlite``, else
``~/.cache/fmtransfer/registry.sqlite`` (:func:`default_path`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmtransfer.errors import ArtifactError, ConfigError
from fmtransfer.lineage.io import sha256_file
from fmtransfer.paths import DEFAULT_CACHE, cache_dir

log = logging.getLogger(__name__)

ENV = "FMTRANSFER_REGISTRY"
FILE_NAME = "registry.sqlite"
BUSY_TIMEOUT_S = 60.0
_OFF = ("", "0", "off", "false", "no", "none", "disabled")
_SHA = re.compile(r"^[0-9a-f]{64}$")
# 2: locations.replaced_by
SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS artifacts (
    sha256 TEXT PRIMARY KEY CHECK (length(sha256) = 64),
    kind TEXT NOT NULL,
    region TEXT,
    name TEXT,
    bytes INTEGER,
    metrics TEXT NOT NULL DEFAULT '{}',
    stage TEXT,
    role TEXT,
    run_id TEXT,
    run_dir TEXT,
    created TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS artifacts_kind_region ON artifacts (kind, region);
CREATE TABLE IF NOT EXISTS locations (
    sha256 TEXT NOT NULL REFERENCES artifacts (sha256),
    path TEXT NOT NULL,
    added TEXT NOT NULL,
    replaced_by TEXT,
    PRIMARY KEY (sha256, path)
);
CREATE INDEX IF NOT EXISTS locations_path ON locations (path);
CREATE TABLE IF NOT EXISTS edges (
    child TEXT NOT NULL REFERENCES artifacts (sha256),
    parent TEXT NOT NULL REFERENCES artifacts (sha256),
    role TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (child, parent, role)
);
CREATE INDEX IF NOT EXISTS edges_parent ON edges (parent);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    region TEXT NOT NULL,
    stage TEXT NOT NULL,
    action TEXT NOT NULL CHECK (action IN ('promote', 'rollback')),
    sha256 TEXT NOT NULL REFERENCES artifacts (sha256),
    previous TEXT,
    decision TEXT NOT NULL CHECK (decision IN ('accepted', 'refused')),
    evidence TEXT NOT NULL,
    user TEXT,
    created TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS history_no_update BEFORE UPDATE ON history
BEGIN SELECT RAISE(ABORT, 'the promotion history is append-only'); END;
CREATE TRIGGER IF NOT EXISTS history_no_delete BEFORE DELETE ON history
BEGIN SELECT RAISE(ABORT, 'the promotion history is append-only'); END;
"""


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def default_path() -> Path | None:
    """The registry's file: ``$FMTRANSFER_REGISTRY`` (None when it says ``off``), else beside the scan cache."""
    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in _OFF else Path(value).expanduser()
    return (cache_dir() or DEFAULT_CACHE.expanduser()) / FILE_NAME  # an empty cache variable: the default folder


def resolve_path(value: Any = None) -> Path | None:
    """A config value (a path, null for the default, false/``off`` for none) -> the registry file or None."""
    if value is None:
        return default_path()
    if value is False or str(value).strip().lower() in _OFF:
        return None
    return Path(str(value)).expanduser()


@dataclass
class Artifact:
    """One registry row, with where its file lies."""

    sha256: str
    kind: str
    region: str | None
    name: str | None
    bytes: int | None
    metrics: dict[str, Any]
    stage: str | None
    role: str | None
    run_id: str | None
    run_dir: str | None
    created: str
    paths: list[str] = field(default_factory=list)

    @property
    def short(self) -> str:
        return self.sha256[:12]

    @property
    def path(self) -> str | None:
        """The first place it was registered at that still exists, else the first one."""
        for p in self.paths:
            if Path(p).is_file():
                return p
        return self.paths[0] if self.paths else None

    def describe(self) -> str:
        return f"{self.kind} {self.short} ({self.name or '-'}, region {self.region or '-'})"


@dataclass
class Check:
    """``verify``'s finding for one file of one artifact: ``ok``, ``tampered`` or ``missing``."""

    artifact: Artifact
    path: str
    status: str


class Registry:
    """An open registry file. Each method runs in its own transaction unless inside :meth:`transaction`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except (OSError, sqlite3.Error) as e:
            raise ArtifactError(f"registry {self.path} cannot be opened ({type(e).__name__}: {e}); set "
                                f"{ENV} to a writable file, or {ENV}=off") from e
        self.db.row_factory = sqlite3.Row
        self._depth = 0
        try:
            self.db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            self._wal()
            self.db.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: a crash loses no committed row
            self.db.execute("PRAGMA foreign_keys = ON")
            self._create()
        except sqlite3.DatabaseError as e:
            self.db.close()
            raise ArtifactError(f"registry {self.path} is not a usable SQLite file ({e})") from e

    def _wal(self) -> None:
        """WAL mode. Two processes that open a new file at once both ask for the lock that switches it; SQLite answers
        one of them "database is locked" at once, without its busy handler (waiting could deadlock): that one asks
        again, until the busy timeout (the file is in WAL mode by then, and asking again costs nothing)."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                self.db.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def _create(self) -> None:
        """The tables, in one script in one transaction (executescript commits a transaction opened around it)."""
        for attempt in (0, 1):
            try:
                self.db.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}{self._migration()}"
                                      f"PRAGMA user_version = {SCHEMA_VERSION};COMMIT;")
                return
            except sqlite3.OperationalError as e:  # another process migrated the file between our look and our write
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                if attempt or "duplicate column" not in str(e):
                    raise

    def _migration(self) -> str:
        """What a file of an earlier schema version lacks (its tables exist: CREATE IF NOT EXISTS keeps them)."""
        columns = {r[1] for r in self.db.execute("PRAGMA table_info(locations)")}
        return "ALTER TABLE locations ADD COLUMN replaced_by TEXT;" if columns and "replaced_by" not in columns else ""

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken up front (``BEGIN IMMEDIATE``): nested calls join the outer one."""
        if self._depth:
            self._depth += 1
            try:
                yield self.db
            finally:
                self._depth -= 1
            return
        self.db.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        else:
            self.db.execute("COMMIT")
        finally:
            self._depth = 0

    # --- writing ------------------------------------------------------------------------------------
    def register(self, sha256: str, kind: str, *, path: str | os.PathLike | None = None, region: str | None = None,
                 name: str | None = None, size: int | None = None, metrics: dict[str, Any] | None = None,
                 stage: str | None = None, role: str | None = None, run_id: str | None = None,
                 run_dir: str | None = None, parents: Iterable[str | tuple[str, str]] = ()) -> bool:
        """Add an artifact (idempotent: the same sha256 again only adds a new location and new edges).

        Args:
            sha256: the hex digest of the file's bytes (a data set: its content fingerprint).
            kind: ``base``, ``adapter``, ``onnx``, ``curated_manifest``, ``monitor_reference``, ``data``, ...
            path: where the file lies (absolute after resolving); None for an artifact with no file (data).
            parents: sha256 of each parent, or (sha256, role); every one must be registered already.

        Returns:
            True when the row is new.
        Raises:
            ArtifactError: a malformed digest, or a parent the registry does not hold.
        """
        if not _SHA.match(sha256 or ""):
            raise ArtifactError(f"registry: {sha256!r} is not a sha256 hex digest (64 lowercase hex digits)")
        edges = [(p, "") if isinstance(p, str) else (p[0], p[1]) for p in parents]
        with self.transaction() as db:
            unknown = [p for p, _ in edges if p != sha256 and not self._exists(p)]
            if unknown:
                raise ArtifactError(f"registry: unknown parent(s) {', '.join(u[:12] for u in unknown)} of {kind} "
                                    f"{sha256[:12]}{f' ({path})' if path else ''}: register the parent first")
            row = db.execute("SELECT run_dir FROM artifacts WHERE sha256 = ?", (sha256,)).fetchone()
            values = (kind, region, name, size, json.dumps(metrics or {}, sort_keys=True, default=str), stage,
                      role, run_id, run_dir)
            if row is None:
                db.execute("INSERT INTO artifacts (kind, region, name, bytes, metrics, stage, role, run_id, run_dir, "
                           "sha256, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (*values, sha256, now()))
            elif row["run_dir"] is None and run_dir is not None:
                # first seen as some run's input; now its producing run registers it: that run describes it
                db.execute("UPDATE artifacts SET kind = ?, region = ?, name = ?, bytes = ?, metrics = ?, stage = ?, "
                           "role = ?, run_id = ?, run_dir = ? WHERE sha256 = ?", (*values, sha256))
            if path is not None:
                where = str(Path(path).resolve())
                # a rerun into the same run dir replaced the file: the earlier artifact no longer lies there
                db.execute("UPDATE locations SET replaced_by = ? WHERE path = ? AND sha256 != ? AND replaced_by IS NULL",
                           (sha256, where, sha256))
                db.execute("INSERT INTO locations (sha256, path, added) VALUES (?, ?, ?) ON CONFLICT (sha256, path) "
                           "DO UPDATE SET replaced_by = NULL", (sha256, where, now()))
            db.executemany("INSERT OR IGNORE INTO edges (child, parent, role) VALUES (?, ?, ?)",
                           [(sha256, p, r) for p, r in edges if p != sha256])
        return row is None

    def register_file(self, path: str | os.PathLike, kind: str, **kwargs: Any) -> str:
        """Hash ``path`` and register it; returns its sha256."""
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"registry: {path} is not a file")
        digest = sha256_file(path)
        self.register(digest, kind, path=path, size=path.stat().st_size, name=kwargs.pop("name", path.name), **kwargs)
        return digest

    def record_decision(self, region: str, stage: str, action: str, sha256: str, decision: str,
                        evidence: dict[str, Any], previous: str | None) -> int:
        """Append one row to the promotion history; returns its id."""
        with self.transaction() as db:
            cur = db.execute("INSERT INTO history (region, stage, action, sha256, previous, decision, evidence, user, "
                             "created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (region, stage, action, sha256, previous, decision,
                              json.dumps(evidence, sort_keys=True, default=str), _user(), now()))
            return int(cur.lastrowid)

    # --- reading ------------------------------------------------------------------------------------
    def _exists(self, sha256: str) -> bool:
        return self.db.execute("SELECT 1 FROM artifacts WHERE sha256 = ?", (sha256,)).fetchone() is not None

    def _artifact(self, row: sqlite3.Row) -> Artifact:
        paths = [r[0] for r in self.db.execute("SELECT path FROM locations WHERE sha256 = ? AND replaced_by IS NULL "
                                               "ORDER BY added, path",
                                               (row["sha256"],))]
        return Artifact(sha256=row["sha256"], kind=row["kind"], region=row["region"], name=row["name"],
                        bytes=row["bytes"], metrics=json.loads(row["metrics"]), stage=row["stage"], role=row["role"],
                        run_id=row["run_id"], run_dir=row["run_dir"], created=row["created"], paths=paths)

    def get(self, sha256: str) -> Artifact | None:
        row = self.db.execute("SELECT * FROM artifacts WHERE sha256 = ?", (sha256,)).fetchone()
        return self._artifact(row) if row else None

    def find(self, ref: str) -> Artifact:
        """An artifact by sha256, a unique prefix of it (6+ digits), or the path of a registered file.

        Raises:
            ArtifactError: nothing or more than one artifact matches.
        """
        ref = str(ref).strip()
        if re.fullmatch(r"[0-9a-f]{6,64}", ref):
            rows = self.db.execute("SELECT * FROM artifacts WHERE sha256 LIKE ? LIMIT 3", (ref + "%",)).fetchall()
            if len(rows) == 1:
                return self._artifact(rows[0])
            if len(rows) > 1:
                raise ArtifactError(f"registry: {ref!r} is the start of several artifacts' sha256; give more digits")
        path = Path(ref).expanduser()
        if path.exists():
            resolved = str(path.resolve())
            rows = self.db.execute("SELECT sha256 FROM locations WHERE path = ? AND replaced_by IS NULL",
                                   (resolved,)).fetchall()
            if rows and path.is_file():
                digest = sha256_file(path)
                if digest in {r[0] for r in rows}:
                    return self.get(digest)
                raise ArtifactError(f"registry: {path}'s bytes (sha256 {digest[:12]}...) are not what was registered "
                                    f"there ({', '.join(r[0][:12] for r in rows)}); it was changed or replaced")
            if path.is_file():
                found = self.get(sha256_file(path))
                if found is not None:
                    return found
        raise ArtifactError(f"registry {self.path}: no artifact {ref!r} (a sha256, its first 6+ digits, or a "
                            f"registered file's path; `fmtransfer registry list` shows them)")

    def list(self, kind: str | None = None, region: str | None = None) -> list[Artifact]:
        sql, args = "SELECT * FROM artifacts WHERE 1 = 1", []
        if kind is not None:
            sql, args = sql + " AND kind = ?", [*args, kind]
        if region is not None:
            sql, args = sql + " AND region = ?", [*args, region]
        return [self._artifact(r) for r in self.db.execute(sql + " ORDER BY created, sha256", args)]

    def parents(self, sha256: str) -> list[tuple[Artifact, str]]:
        rows = self.db.execute("SELECT a.*, e.role AS edge_role FROM edges e JOIN artifacts a ON a.sha256 = e.parent "
                               "WHERE e.child = ? ORDER BY a.kind, a.sha256", (sha256,)).fetchall()
        return [(self._artifact(r), r["edge_role"]) for r in rows]

    def children(self, sha256: str, kind: str | None = None) -> list[tuple[Artifact, str]]:
        rows = self.db.execute("SELECT a.*, e.role AS edge_role FROM edges e JOIN artifacts a ON a.sha256 = e.child "
                               "WHERE e.parent = ? ORDER BY a.created, a.sha256", (sha256,)).fetchall()
        return [(self._artifact(r), r["edge_role"]) for r in rows if kind is None or r["kind"] == kind]

    def history(self, region: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM history", ()
        if region is not None:
            sql, args = sql + " WHERE region = ?", (region,)
        return [{**dict(r), "evidence": json.loads(r["evidence"])} for r in self.db.execute(sql + " ORDER BY id", args)]

    def production_stack(self, region: str, stage: str) -> list[str]:
        """The region's releases at ``stage``, oldest first, as its accepted promotions and rollbacks left them:
        the last one is what runs there now."""
        stack: list[str] = []
        for row in self.history(region):
            if row["stage"] != stage or row["decision"] != "accepted":
                continue
            if row["action"] == "promote":
                stack.append(row["sha256"])
            elif stack:
                stack.pop()
        return stack

    def counts(self) -> dict[str, int]:
        return {t: int(self.db.execute(f"SELECT count(*) FROM {t}").fetchone()[0])
                for t in ("artifacts", "locations", "edges", "history")}

    # --- checking -----------------------------------------------------------------------------------
    def verify(self, threads: int = 2) -> list[Check]:
        """Re-hash every registered file: ``ok``, ``tampered`` (other bytes) or ``missing``. A file that a later
        registration replaced at its path (a rerun into the same run dir) is that artifact's now."""
        rows = self.db.execute("SELECT sha256, path FROM locations WHERE replaced_by IS NULL ORDER BY path").fetchall()
        artifacts = {r[0]: self.get(r[0]) for r in rows}

        def check(row: sqlite3.Row) -> Check:
            sha, path = row[0], row[1]
            if not Path(path).is_file():
                return Check(artifacts[sha], path, "missing")
            return Check(artifacts[sha], path, "ok" if sha256_file(path) == sha else "tampered")

        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:  # hashlib hashes without the GIL
            return list(pool.map(check, rows))


def _user() -> str | None:
    try:
        import getpass

        return getpass.getuser()
    except (OSError, KeyError, ImportError):
        return None


# --- what a run registers -------------------------------------------------------------------------------
# (stage or "*", output role) -> kind; outputs not named here (plots, predictions, logs) are not registered
OUTPUT_KINDS: dict[tuple[str, str], str] = {
    ("pretrain", "model"): "base", ("pretrain", "weights"): "weights",
    ("merge", "model"): "merged_model", ("merge", "weights"): "weights",
    ("curate", "manifest"): "curated_manifest",
    ("adapt", "adapter"): "adapter",
    ("export", "onnx_fp32"): "onnx", ("export", "onnx_int8"): "onnx",
    ("export", "onnx_fp32_rejected"): "onnx", ("export", "onnx_int8_rejected"): "onnx",
    ("export", "reference_fp32_json"): "monitor_reference", ("export", "reference_int8_json"): "monitor_reference",
    ("monitor", "metrics"): "monitor_report",
    ("shadow", "metrics"): "shadow_report",
}
# input role -> kind, for an input that the registry does not hold yet (made before it, or elsewhere)
INPUT_KINDS: dict[str, str] = {
    "base": "base", "model": "model", "adapter": "adapter", "calibration_manifest": "manifest",
    "backbone_checkpoint": "checkpoint", "teacher": "base", "reference_statistics": "monitor_reference",
    "production": "model", "candidate": "model", "monitoring_reference": "monitor_reference", "embeddings": "embeddings",
}
# headline metrics kept in a row (the run's metrics file holds the rest)
_KEPT_METRICS = ("passed", "gates", "do_no_harm", "sizes_bytes", "recommendation", "reasons", "agreement", "gain",
                 "drift", "summary", "method", "recipe", "backbone", "calibration", "selected", "n_selected")


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    kept = {k: metrics[k] for k in _KEPT_METRICS if k in metrics}
    for split in ("test", "val"):
        part = metrics.get(split)
        if isinstance(part, dict):
            kept[split] = part.get("overall", {k: v for k, v in part.items() if isinstance(v, (int, float, str))})
    if isinstance(metrics.get("stats"), dict):  # shadow
        kept.update({k: metrics["stats"][k] for k in ("agreement", "gain", "candidate_accuracy",
                                                       "production_accuracy") if k in metrics["stats"]})
    return kept


def _abs(path: str, run_dir: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else run_dir / p


def _kind_of_input(role: str, path: Path) -> str | None:
    if path.suffix == ".onnx":
        return "onnx"
    return INPUT_KINDS.get(role)


def register_run(reg: Registry, record: dict[str, Any]) -> list[str]:
    """Register what a finished run made (its ``run.json`` as a dict), in one transaction.

    Its inputs that the registry lacks join as rows without a producing run; its data sets join as ``data`` rows
    keyed by their fingerprint. Each output's parents are the run's inputs and data (an ONNX's monitoring reference
    also has that ONNX; a model header its weights).

    Returns:
        the sha256 of the outputs registered.
    """
    run_dir = Path(record["run_dir"])
    stage = record["stage"]
    data = record.get("data") or []
    region = _region(data)
    metrics = _run_metrics(record, run_dir)
    made: list[str] = []
    if not any((stage, e["role"]) in OUTPUT_KINDS for e in record.get("outputs", [])):
        return made  # it made no artifact (evaluate, predict, plan): its inputs are no one's parents
    with reg.transaction():
        parents: list[tuple[str, str]] = []
        for d in data:
            if _SHA.match(str(d.get("fingerprint"))):
                spec = d.get("spec") or {}
                reg.register(d["fingerprint"], "data", name=d.get("recipe"), region=spec.get("region"),
                             metrics={"recipe": d.get("recipe"), "source": spec.get("source")})
                parents.append((d["fingerprint"], d.get("role") or "data"))
                parents.extend(_subset(reg, spec, run_dir))
        for entry in record.get("inputs", []):
            path = _abs(entry["path"], run_dir)
            kind = _kind_of_input(entry["role"], path)
            if kind is not None:
                known = reg.get(entry["sha256"]) is not None  # then its producer registered where it lies
                reg.register(entry["sha256"], kind, path=path if path.is_file() and not known else None,
                             name=path.name, size=entry.get("bytes"))
                parents.append((entry["sha256"], entry["role"]))
        by_role = {e["role"]: e for e in record.get("outputs", [])}
        # an output made from another output of the run (its companion) comes after it
        for entry in sorted(record.get("outputs", []), key=lambda e: bool(_companions(e["role"], by_role))):
            kind = OUTPUT_KINDS.get((stage, entry["role"]))
            if kind is None:
                continue
            path = _abs(entry["path"], run_dir)
            extra = _companions(entry["role"], by_role)
            reg.register(entry["sha256"], kind, path=path, region=region, name=path.name, size=entry.get("bytes"),
                         metrics=metrics, stage=stage, role=entry["role"], run_id=record.get("run_id"),
                         run_dir=str(run_dir), parents=[*extra, *parents])
            made.append(entry["sha256"])
    return made


def _subset(reg: Registry, spec: dict[str, Any], run_dir: Path) -> list[tuple[str, str]]:
    """A recipe's ``subset`` (a curated manifest the train split keeps only the ids of) as a parent, so a model
    trained on a curated subset traces back through ``curate``."""
    subset = spec.get("subset")
    if not isinstance(subset, str) or not subset:
        return []
    path = Path(subset).expanduser()  # as the stage read it (from its working dir), else beside the run
    if not path.is_file():
        path = _abs(subset, run_dir)
    if not path.is_file():
        return []
    digest = sha256_file(path)
    known = reg.get(digest) is not None
    reg.register(digest, "curated_manifest", path=None if known else path, name=path.name,
                 size=path.stat().st_size)
    return [(digest, "subset")]


def _region(data: list[dict[str, Any]]) -> str | None:
    """The run's region: its data's, or what a monitor run watched (``current``), not its reference's."""
    for role in ("data", "current", None):
        for d in data:
            if (role is None or d.get("role") == role) and isinstance(d.get("spec"), dict):
                return d["spec"].get("region")
    return None


def _companions(role: str, by_role: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """Outputs of the same run that an output is made from: a model header's weights, a reference's ONNX."""
    if role == "model" and "weights" in by_role:
        return [(by_role["weights"]["sha256"], "weights")]
    m = re.fullmatch(r"reference_(fp32|int8)_json", role)
    if m and f"onnx_{m.group(1)}" in by_role:
        return [(by_role[f"onnx_{m.group(1)}"]["sha256"], "model")]
    return []


def _run_metrics(record: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    entry = next((e for e in record.get("outputs", []) if e["role"] == "metrics"), None)
    if entry is None:
        return {}
    try:
        return _headline(json.loads(_abs(entry["path"], run_dir).read_text()))
    except (OSError, ValueError, AttributeError):
        return {}


def register_finished_run(record: dict[str, Any], path: Path | None) -> list[str]:
    """The stages' hook (RunRecord's end): register the run, or warn, never fail it.

    A registry that cannot be opened or written (a read-only disk, a locked file past the timeout) costs the run
    nothing: the warning says how to register it later (``fmtransfer registry add <run dir>``).
    """
    if path is None or record.get("status") != "ok":
        return []
    try:
        with Registry(path) as reg:
            made = register_run(reg, record)
    except (ArtifactError, ConfigError, sqlite3.Error, OSError) as e:
        log.warning("registry %s not updated (%s); the run is fine: register it later with `fmtransfer registry "
                    "add %s`", path, e, record.get("run_dir"))
        return []
    if made:
        log.info("registry %s: %d artifact(s) of %s registered", path, len(made), record.get("run_dir"))
        _wandb(record, path, made)
    return made


def _wandb(record: dict[str, Any], path: Path, made: list[str]) -> None:
    from fmtransfer.lineage import registry_wandb

    if not registry_wandb.logged_in():
        return
    try:
        with Registry(path) as reg:
            registry_wandb.log_run(reg, record, made)
    except Exception as e:  # noqa: BLE001 - W&B's failures (network, quota, auth) must not fail a finished run
        log.warning("W&B: the run's artifacts were not logged (%s: %s); they are in the registry %s",
                    type(e).__name__, e, path)
