"""The run lock: one run at a time, with a readable stamp, stale expiry and fencing.

Two backends share one policy (docs/design.md, "Locking"):

- ``local`` (default): a filelock ``SoftFileLease`` marker. filelock stamps it with pid, host,
  process start token and a claim token (our run id), refreshes it from a heartbeat thread, and
  takes it over at once when its holder is provably dead on this host. We add what a cron job
  needs on top: a holder whose marker has not been refreshed for the stale limit (frozen,
  SIGSTOPped, or on another host that went away) is taken over under a kernel-locked gate file,
  after a same-host holder is SIGKILLed (verified by its start token, so a recycled pid is never
  killed). Waiters never write the marker or our side file, so they cannot wipe the stamp.
- ``postgres``: the lease lives in the ``monitor_lease`` row alone (holder, heartbeat, expiry by
  the database's clock), so hosts sharing a cron line need no shared filesystem.

Either way each new holder advances the lease row's epoch, and the run's state writes check it
(``Database.fenced``; docs/design.md "Locking" lists which writes are fenced), so a run whose lock was taken
over, or released under it by ``lock clear``, cannot write. A holder is judged from the local /proc
(dead, or killed when silent) only when its host AND machine identity (``machine_identity``) match
ours, and it is killed only when its stamp carries a process-start token.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import stat
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from monitor.errors import ConfigError, DatabaseError, DatabaseUnavailable, LockHeld

log = logging.getLogger(__name__)

KILL_WAIT_SECONDS = 5.0
STAMP_SETTLE_SECONDS = 5.0


def heartbeat_interval(stale_after: float) -> float:
    return max(min(stale_after / 3.0, 15.0), 0.05)


def _proc_stat(pid: int) -> list[bytes]:
    """/proc/PID/stat after the command name (which may hold spaces): state is [0], start time [19]."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return []
    return data[data.rfind(b")") + 1:].split()


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), None when there is no such process."""
    fields = _proc_stat(pid)
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def process_state(pid: int) -> str | None:
    fields = _proc_stat(pid)
    return fields[0].decode() if fields else None


_INITIAL_PID_NAMESPACE = 0xEFFFFFFC  # the inode Linux reserves for the initial PID namespace


def _read_id(path: str) -> str | None:
    try:
        text = Path(path).read_text(encoding="ascii").strip()
    except (OSError, ValueError):
        return None
    return text or None


def machine_identity() -> str | None:
    """Whose /proc this process sees, recorded beside the host name of a lock holder.

    ``<machine-id>/<boot-id>`` (``-`` for a part that cannot be read), plus ``/pidns-<inode>`` outside
    the initial PID namespace: a pid is judged from the local /proc only when the holder recorded the
    same identity. The boot id is random per kernel boot, so machines cloned with one /etc/machine-id
    still differ; the PID namespace separates containers on one kernel. None when neither id is
    readable (then nobody is ever judged dead from /proc; the lock falls back to staleness).
    """
    machine = _read_id("/etc/machine-id")
    boot = _read_id("/proc/sys/kernel/random/boot_id")
    if machine is None and boot is None:
        return None
    identity = f"{machine or '-'}/{boot or '-'}"
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = _INITIAL_PID_NAMESPACE
    if namespace != _INITIAL_PID_NAMESPACE:
        identity += f"/pidns-{namespace:x}"
    return identity


def process_is(pid: int, start: int | None) -> bool:
    """Whether ``pid`` is alive (not a zombie) and, when ``start`` is known, is the same process."""
    state = process_state(pid)
    if state is None or state in ("Z", "X"):
        return False
    if start is None:
        return True
    return process_start_time(pid) == start


@dataclass
class Holder:
    """Who holds (or last held) the lock, as ``lock status`` shows it."""

    backend: str
    pid: int | None
    host: str | None
    run_id: str | None
    started_at: datetime | None
    heartbeat_at: datetime | None
    epoch: int | None = None
    alive: bool | None = None
    path: str | None = None
    expires_at: datetime | None = None
    machine: str | None = None  # machine_identity() of the holder; None: not recorded
    gone: bool = False  # its process is provably gone (this host and machine, pid dead or reused)

    def age_seconds(self, now: datetime) -> float | None:
        return None if self.started_at is None else max((now - self.started_at).total_seconds(), 0.0)

    def describe(self, now: datetime) -> str:
        age = self.age_seconds(now)
        beat = None if self.heartbeat_at is None else max((now - self.heartbeat_at).total_seconds(), 0.0)
        parts = [
            f"pid {'unknown' if self.pid is None else self.pid}",
            f"host {self.host or 'unknown'}",
            "age unknown" if age is None else f"age {age:.0f}s",
        ]
        if beat is not None:
            parts.append(f"last heartbeat {beat:.0f}s ago")
        return ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in self.__dict__.items()}


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


def check_lock_path(path: Path) -> None:
    """Refuse a symlink; create missing parent directories (0750); require a writable directory."""
    parent = path.parent
    try:
        parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        if not parent.is_dir():
            raise NotADirectoryError(20, "not a directory")
    except OSError as exc:
        raise ConfigError(f"MONITOR_LOCK_FILE: cannot create directory {parent}: {exc.strerror}") from None
    for candidate in (path, Path(f"{path}.holder.json"), Path(f"{path}.gate")):
        try:
            if stat.S_ISLNK(os.lstat(candidate).st_mode):
                raise ConfigError(f"MONITOR_LOCK_FILE: {candidate} is a symlink; refusing to use it")
        except FileNotFoundError:
            pass
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"MONITOR_LOCK_FILE: directory {parent} is not writable")


class RunLock:
    """Common surface of both backends."""

    backend = "?"

    def __init__(self) -> None:
        self.run_id = uuid.uuid4().hex
        self.compromised = threading.Event()
        self.took_over: str | None = None

    def acquire(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def release(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def holder(self) -> Holder | None:  # pragma: no cover - interface
        """Who holds the lock now (None: nobody)."""
        raise NotImplementedError

    def clear(self, *, force: bool) -> Holder | None:  # pragma: no cover - interface
        """Remove a dead holder's lock (any holder's with ``force``); the holder that was cleared."""
        raise NotImplementedError

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class LocalRunLock(RunLock):
    backend = "local"

    def __init__(self, path: Path, *, stale_after: float, now: Callable[[], float] = time.time,
                 database_factory: Callable[[], Any] | None = None) -> None:
        super().__init__()
        self._database_factory = database_factory  # `lock clear` marks the lease row released through it
        self.path = Path(path)
        self.side_file = Path(f"{self.path}.holder.json")
        self.gate_file = Path(f"{self.path}.gate")
        self.stale_after = stale_after
        self._now = now
        self._lease: Any = None
        self.started_at: float | None = None

    def _make_lease(self) -> Any:
        from filelock import SoftFileLease

        return SoftFileLease(
            str(self.path),
            lease_duration=self.stale_after,
            heartbeat_interval=heartbeat_interval(self.stale_after),
            on_compromise=lambda _compromise: self.compromised.set(),
            thread_local=False,
            is_singleton=False,
            timeout=0,
            mode=0o640,
        )

    def acquire(self) -> None:
        from filelock import LeaseSettingsMismatch, Timeout

        check_lock_path(self.path)
        self._lease = self._make_lease()
        try:
            self._lease.acquire(timeout=0)
        except LeaseSettingsMismatch:
            holder = self._settled_holder()
            raise LockHeld(
                f"lock {self.path} is held with a different MONITOR_LOCK_STALE_AFTER"
                f" ({holder.describe(_utc(self._now())) if holder else 'unknown holder'})"
            ) from None
        except Timeout:
            if not self._take_over_silent_holder():
                holder = self._settled_holder()
                what = holder.describe(_utc(self._now())) if holder else "holder unknown"
                raise LockHeld(f"another run holds the lock ({what})") from None
        except OSError as exc:
            raise ConfigError(f"MONITOR_LOCK_FILE: cannot create {self.path}: {exc.strerror or exc}") from None
        self.started_at = self._now()
        self._write_side_file()

    def _settled_holder(self, wait: float = STAMP_SETTLE_SECONDS) -> Holder | None:
        """The holder for a "lock held" message, waiting briefly for a stamp being written.

        filelock creates the marker with O_EXCL and writes its stamp just after, and the winner writes
        the side file (start time) just after that; a loser that looks in between would name
        "pid None". Wait up to ``wait`` seconds for the stamp, and for the side file of a live holder on
        this host, then report whatever is there.
        """
        deadline = time.monotonic() + wait
        while True:
            holder = self.holder()
            # a holder writes its side file a moment after its stamp; until then it cannot be judged from
            # /proc either (the side file names its machine), so wait for it unless it is provably dead
            complete = holder is None or (
                holder.pid is not None and (holder.started_at is not None or holder.alive is False)
            )
            if complete or time.monotonic() >= deadline:
                return holder
            time.sleep(0.01)

    def _take_over_silent_holder(self) -> bool:
        """Take the lock from a holder that stopped refreshing it for the stale limit.

        Runs under a kernel lock on the gate file, so of several contenders only one judges and breaks
        the marker; the others then find a fresh marker and exit 75.
        """
        from filelock import FileLock, Timeout

        try:
            with FileLock(str(self.gate_file), timeout=2, is_singleton=False):
                try:
                    marker = os.lstat(self.path)
                except FileNotFoundError:
                    return self._try_acquire()
                silent_for = self._now() - marker.st_mtime
                if silent_for < self.stale_after:
                    return False
                owner = self._lease.owner
                if not self._marker_is(marker):  # the stamp we read may belong to a newer marker
                    return not self.path.exists() and self._try_acquire()
                host = _filelock_host()
                spared = None
                if owner is not None and owner.hostname == host:
                    start = None if owner.start is None else owner.start % 2**64
                    if start is None:
                        # a live pid without a start token may be a recycled one: never kill it
                        spared = "its stamp has no process-start token"
                    elif not _same_machine(self._side_record(owner)):
                        # same host name, but maybe another machine (or container): its pid is not ours
                        spared = "it is not provably on this machine"
                    elif process_is(owner.pid, start):
                        log.warning("lock holder pid %s silent for %.0fs: stopping it (SIGKILL)", owner.pid, silent_for)
                        if not _kill_and_wait(owner.pid, start):
                            return False
                if spared is not None:
                    log.warning("lock holder pid %s silent for %.0fs: not stopped (%s); taking the lock over,"
                                " the epoch fences it", owner.pid, silent_for, spared)
                if not self._marker_is(marker):
                    # refreshed or replaced while we judged it; released meanwhile: free to take
                    return not self.path.exists() and self._try_acquire()
                self._lease.force_break()
                self.took_over = (
                    f"took the lock over from pid {owner.pid if owner else '?'} on "
                    f"{owner.hostname if owner else '?'} (silent for {silent_for:.0f}s)"
                    + (f"; not stopped: {spared}" if spared else "")
                )
                return self._try_acquire()
        except Timeout:
            return False

    def _side_record(self, owner: Any) -> dict[str, Any]:
        """The side file, when it describes ``owner`` (same claim token); else {}."""
        try:
            side = json.loads(self.side_file.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(side, dict) or owner is None or side.get("token") != owner.token:
            return {}
        return side

    def _marker_is(self, seen: os.stat_result) -> bool:
        """Whether the marker on disk is still the one ``seen`` (same file, not refreshed since)."""
        try:
            current = os.lstat(self.path)
        except FileNotFoundError:
            return False
        return (current.st_ino, current.st_mtime_ns) == (seen.st_ino, seen.st_mtime_ns)

    def _try_acquire(self) -> bool:
        from filelock import Timeout

        try:
            self._lease.acquire(timeout=0)
            return True
        except Timeout:
            return False

    def _write_side_file(self) -> None:
        record = {
            "run_id": self.run_id,
            "token": self._lease.token,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "machine": machine_identity(),
            "started_at": _utc(self.started_at or self._now()).isoformat(),
            "stale_after": self.stale_after,
        }
        tmp = Path(f"{self.side_file}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o640)
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle)
        os.replace(tmp, self.side_file)

    def release(self) -> None:
        if self._lease is None:
            return
        with_token = self._lease.token
        try:
            side = json.loads(self.side_file.read_text())
            if side.get("token") == with_token:
                self.side_file.unlink()
        except (OSError, ValueError):
            pass
        try:
            if self._lease.is_locked:
                self._lease.release()
        except OSError:
            pass
        self._lease = None

    def holder(self) -> Holder | None:
        """The stamp as it is on disk (the marker is authoritative; the side file adds run id and start)."""
        from filelock import SoftFileLease

        probe = self._lease or SoftFileLease(str(self.path), lease_duration=self.stale_after, is_singleton=False)
        try:
            marker = os.lstat(self.path)
        except FileNotFoundError:
            return None
        owner = probe.owner
        side: dict[str, Any] = {}
        try:
            side = json.loads(self.side_file.read_text())
        except (OSError, ValueError):
            pass
        if owner is not None and side.get("token") not in (None, owner.token):
            side = {}  # the side file describes an older holder
        started = side.get("started_at")
        alive = None
        # judged from our /proc only for a holder on this host AND this machine (its side file says)
        if owner is not None and owner.hostname == _filelock_host() and _same_machine(side):
            alive = process_is(owner.pid, None if owner.start is None else owner.start % 2**64)
        return Holder(
            gone=alive is False,
            backend=self.backend,
            pid=owner.pid if owner else side.get("pid"),
            host=(owner.hostname if owner else side.get("host")),
            # the run's own id (as in monitor_runs and every log line), not the file lease's token
            run_id=side.get("run_id") or (owner.token if owner else None),
            started_at=datetime.fromisoformat(started) if started else None,
            heartbeat_at=_utc(marker.st_mtime),
            alive=alive,
            path=str(self.path),
            machine=side.get("machine"),
        )

    def clear(self, *, force: bool) -> Holder | None:
        """Remove the marker. Refuses while its holder is provably alive, or cannot be verified from here
        (another host or machine) and refreshed its stamp within the stale limit, unless ``force``."""
        from filelock import FileLock

        check_lock_path(self.path)
        holder = self.holder()
        if holder is None:
            return None
        if holder.alive and not force:
            raise LockHeld(f"lock holder is alive ({holder.describe(_utc(self._now()))}); use --force to clear anyway")
        fresh = holder.heartbeat_at is not None and self._now() - holder.heartbeat_at.timestamp() < self.stale_after
        if holder.alive is None and fresh and not force:
            raise LockHeld(f"lock holder cannot be verified from this machine and its stamp is fresh"
                           f" ({holder.describe(_utc(self._now()))}); use --force to clear anyway")
        from filelock import SoftFileLease

        with FileLock(str(self.gate_file), timeout=5, is_singleton=False):
            probe = SoftFileLease(str(self.path), lease_duration=self.stale_after, is_singleton=False)
            # Fence the holder at once (its next write transaction is refused), then remove its marker.
            self._release_lease_row(self._side_record(probe.owner).get("run_id"))
            probe.force_break()
            try:
                self.side_file.unlink()
            except FileNotFoundError:
                pass
        return holder

    def _release_lease_row(self, run_id: str | None) -> None:
        """Mark the holder's lease row released (only that run's, when its side file names it)."""
        if self._database_factory is None:
            return
        try:
            db = self._database_factory()
            try:
                db.clear_lease(run_id)
            finally:
                db.close()
        except Exception as exc:  # noqa: BLE001 - the marker is still cleared; say what was not done
            log.warning("lock clear: the lease row was not marked released (%s); the old holder is fenced only"
                        " once its heartbeat notices", getattr(exc, "message", None) or type(exc).__name__)


def _same_machine(side: dict[str, Any]) -> bool:
    """Whether a holder's side file records this machine's identity (unrecorded: not provably ours)."""
    ours = machine_identity()
    return ours is not None and side.get("machine") == ours


def _filelock_host() -> str:
    """The host string filelock stamps into its markers (it adds a PID-namespace suffix in containers)."""
    try:
        from filelock._identity import host_name
    except ImportError:  # pragma: no cover - a filelock without it stamps the plain host name
        return socket.gethostname()
    return host_name()


def _kill_and_wait(pid: int, start: int | None) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    deadline = time.monotonic() + KILL_WAIT_SECONDS
    while time.monotonic() < deadline:
        if not process_is(pid, start):
            return True
        time.sleep(0.02)
    return False


class PostgresRunLock(RunLock):
    """The lease as a row in PostgreSQL: expiry and heartbeat by the database's clock."""

    backend = "postgres"

    def __init__(self, database_factory: Callable[[], Any], *, stale_after: float, host: str) -> None:
        super().__init__()
        self._factory = database_factory
        self.stale_after = stale_after
        self.host = host
        self.epoch: int | None = None
        self._db: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        self._db = self._factory()
        pid = os.getpid()
        start = process_start_time(pid)
        machine = machine_identity()
        kwargs = dict(run_id=self.run_id, host=self.host, pid=pid, start=None if start is None else str(start),
                      stale_after=self.stale_after, machine=machine)
        epoch = self._db.try_acquire_lease(**kwargs)
        if epoch is None:
            status = self._db.lease_status() or {}
            # Judged from our /proc only when host AND machine match: two machines may share MONITOR_HOST_ID.
            if (status.get("holder_host") == self.host and status.get("holder_pid")
                    and machine is not None and status.get("holder_machine") == machine):
                recorded = status.get("holder_start")
                if not process_is(int(status["holder_pid"]), int(recorded) if recorded else None):
                    epoch = self._db.try_acquire_lease(**kwargs, seen_epoch=status["epoch"])
                    if epoch is not None:
                        self.took_over = f"took the lease over from dead pid {status['holder_pid']} on {self.host}"
        if epoch is None:
            holder = self.holder()
            self._db.close()
            self._db = None
            what = holder.describe(holder.heartbeat_at or datetime.now(timezone.utc)) if holder else "unknown"
            raise LockHeld(f"another run holds the lease ({what})")
        self.epoch = epoch
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        interval = heartbeat_interval(self.stale_after)
        db = None
        try:
            db = self._factory()
            while not self._stop.wait(interval):
                if not db.heartbeat_lease(self.epoch, stale_after=self.stale_after):
                    self.compromised.set()
                    return
        except Exception:  # noqa: BLE001 - a failed heartbeat only means the lease may lapse
            log.warning("lease heartbeat failed; the lease may lapse")
        finally:
            if db is not None:
                db.close()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._db is not None and self.epoch is not None:
            try:
                self._db.release_lease(self.epoch)
            except (DatabaseUnavailable, DatabaseError) as exc:
                # The lease's own connection is gone (a restart, pg_terminate_backend): the lease is not
                # released, so it lapses after MONITOR_LOCK_STALE_AFTER; the run's outcome stands.
                log.warning("lease not released (%s); it lapses when stale", exc.message)
            finally:
                self._db.close()
        self._db = None

    def clear(self, *, force: bool) -> Holder | None:
        """Release the lease row. Refuses while the holder's lease is live, unless ``force``."""
        db = self._factory()
        try:
            holder = _lease_holder(db.lease_status())
            if holder is None or holder.alive is False:
                if holder is not None:
                    db.clear_lease()
                return holder
            if not force:
                raise LockHeld(f"lease holder is live ({holder.describe(datetime.now(timezone.utc))});"
                               " use --force to clear anyway")
            db.clear_lease()
            return holder
        finally:
            db.close()

    def holder(self) -> Holder | None:
        db = self._db or self._factory()
        try:
            status = db.lease_status()
        finally:
            if db is not self._db:
                db.close()
        holder = _lease_holder(status)
        if holder is not None and holder.alive is None and status:
            # A live lease held from this host and machine: judged from our /proc (dead, or pid reused).
            machine = machine_identity()
            if (holder.host == self.host and holder.pid and machine is not None and holder.machine == machine):
                recorded = status.get("holder_start")
                holder.alive = process_is(int(holder.pid), int(recorded) if recorded else None)
                holder.gone = not holder.alive
        return holder


def _lease_holder(status: dict[str, Any] | None) -> Holder | None:
    if not status or status.get("holder_run_id") is None:
        return None
    now = status.get("db_now")
    alive = None
    if status.get("released_at") is not None:
        alive = False
    elif status.get("expires_at") is not None and now is not None and status["expires_at"] < now:
        alive = False
    return Holder(
        backend="postgres",
        pid=status.get("holder_pid"),
        host=status.get("holder_host"),
        run_id=status.get("holder_run_id"),
        started_at=status.get("acquired_at"),
        heartbeat_at=status.get("heartbeat_at"),
        epoch=status.get("epoch"),
        alive=alive,
        expires_at=status.get("expires_at"),
        machine=status.get("holder_machine"),
    )


NONCE_LOCK_TIMEOUT = 5.0  # seconds to wait for another process's nonce; then nothing is signed


class NonceSource:
    """Nonces for one signing key, unique across every process of this host that uses the same file.

    Hyperliquid keeps the 100 highest nonces per signer and refuses a nonce used before (reference §3.2); the
    SDK's nonce is the local millisecond time, so two runs (or shards) signing with one agent key in the same
    millisecond collide. Each nonce here is ``max(now_ms, last + 1)``, with ``last`` read from and written back
    to ``path`` under an exclusive file lock (a kernel lock: released when its holder dies), so nonces
    of one key on one host strictly increase. Other hosts do not share the file: give each host (or shard)
    its own agent key (docs/design.md, "Keys"). Raises OSError (filelock's Timeout is one) when the file cannot be
    used; the caller then signs nothing.
    """

    def __init__(self, path: Path, now_ms: Callable[[], int] | None = None) -> None:
        self.path = Path(path)
        self._now_ms = now_ms or (lambda: time.time_ns() // 1_000_000)
        self._thread_lock = threading.Lock()

    @classmethod
    def for_key(cls, data_dir: Path, signer: str) -> NonceSource:
        """The source of agent ``signer`` (its address, never the key) under the data directory."""
        return cls(Path(data_dir) / "nonces" / f"{signer.lower()}.nonce")

    def __call__(self) -> int:
        from filelock import FileLock

        with self._thread_lock:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with FileLock(str(self.path) + ".lock", timeout=NONCE_LOCK_TIMEOUT):
                try:
                    last = int(self.path.read_text(encoding="ascii").strip() or 0)
                except FileNotFoundError:
                    last = 0
                except ValueError:
                    last = 0  # not a number (written by hand?): the clock alone
                nonce = max(self._now_ms(), last + 1)
                temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
                temp.write_text(str(nonce), encoding="ascii")
                os.replace(temp, self.path)  # atomic: a crash leaves the old value or the new one
                return nonce
