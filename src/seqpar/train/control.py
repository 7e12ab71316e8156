"""Run control for `seqpar train`: stop signals, heartbeats, the stall watchdog, worker
supervision, parent-death detection and the one-run-per-output-directory lock.

Workers (local launcher or torchrun):

- `install_stop_handlers` turns SIGTERM/SIGINT into a stop request (`stop_signal()`); the
  training loop all-reduces it (MAX) at every step boundary, so every rank stops after the
  same step: on SIGTERM it saves a checkpoint first, on SIGINT it stops without one.
  `TrainingStopped` carries the outcome to the launcher.
- `die_with_parent` (prctl PR_SET_PDEATHSIG on Linux, plus a parent-pid poll in the
  heartbeat thread elsewhere) kills a worker whose launcher died, even by SIGKILL.
- `start_heartbeat` rewrites `heartbeat_rank<r>.json` (pid, last completed step, a beat
  counter) from a thread; a stopped or frozen process stops beating.

Launcher (`seqpar train` without torchrun):

- `SignalCatcher` records SIGTERM/SIGINT; `supervise` forwards them to the workers, waits
  `stop_grace` seconds, then kills what is left; it watches the heartbeats (`StallWatch`)
  and names a rank that stopped beating; a failing worker ends the run at once.
- `RunLock` takes ``<out_dir>/seqpar.lock`` with O_CREAT|O_EXCL (pid, host); a lock left by
  a dead process on this host is taken over with a note.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_sentinels
from pathlib import Path
from typing import Any

from ..io import atomic_write

__all__ = ["TrainingStopped", "install_stop_handlers", "stop_signal", "die_with_parent", "start_heartbeat",
           "report_step", "stall_limit", "StallWatch", "SignalCatcher", "Outcome", "supervise", "RunLock",
           "write_record", "read_record", "signal_name", "stop_message"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
LOCK_NAME = "seqpar.lock"


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# -- stop requests (workers) -----------------------------------------------------------------------
_stop = {"signal": 0}


def _request_stop(signum: int, _frame: Any = None) -> None:
    _stop["signal"] = max(_stop["signal"], int(signum))  # SIGTERM (15) outranks SIGINT (2): save


def install_stop_handlers() -> None:
    """SIGTERM/SIGINT -> a stop request the training loop honours at the next step boundary."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _request_stop)


def stop_signal() -> int:
    """The requested stop signal number (SIGTERM wins over SIGINT), or 0."""
    return _stop["signal"]


class TrainingStopped(Exception):
    """Training stopped on a signal after `step` (every rank the same); `checkpoint` saved, or None."""

    def __init__(self, signum: int, step: int, checkpoint: str | None, reason: str = ""):
        super().__init__(f"stopped by {signal_name(signum)} at step {step}")
        self.signum, self.step, self.checkpoint, self.reason = signum, step, checkpoint, reason

    def to_dict(self) -> dict[str, Any]:
        return {"signal": self.signum, "step": self.step, "checkpoint": self.checkpoint, "reason": self.reason}


def stop_message(signum: int, step: int | None, checkpoint: str | None, reason: str = "",
                 latest: str | None = None) -> str:
    """The one line printed when a run stops on a signal."""
    name = signal_name(signum)
    where = f" at step {step}" if step is not None else ""
    if checkpoint:
        return f"seqpar train: stopped by {name}{where}; checkpoint {checkpoint} (resume with --resume latest)"
    why = f" ({reason})" if reason else ""
    tail = (f"latest checkpoint {latest} (resume with --resume latest)" if latest
            else "no checkpoint to resume from")
    return f"seqpar train: stopped by {name}{where}; no checkpoint saved{why}; {tail}"


# -- parent death and heartbeats (workers) -----------------------------------------------------------
def die_with_parent(parent_pid: int) -> None:
    """Get SIGKILLed when the parent process dies (Linux prctl); exit now if it is already gone."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    if os.getppid() != parent_pid:  # died before prctl took effect
        os._exit(1)


def stall_limit(cfg: Any) -> float:
    """Seconds without a heartbeat after which a rank counts as stalled (cfg.faults.stall_timeout, or derived)."""
    return float(cfg.faults.stall_timeout) if cfg.faults.stall_timeout else min(60.0, float(cfg.faults.timeout) / 2)


class _Heartbeat(threading.Thread):
    def __init__(self, directory: Path, rank: int, interval: float, parent_pid: int | None):
        super().__init__(name="seqpar-heartbeat", daemon=True)
        self.path = directory / f"heartbeat_rank{rank}.json"
        self.rank, self.interval, self.parent_pid = rank, interval, parent_pid
        self.step, self.beat = 0, 0

    def write(self) -> None:
        self.beat += 1
        record = {"rank": self.rank, "pid": os.getpid(), "step": self.step, "beat": self.beat}
        atomic_write(self.path, json.dumps(record), durable=False)

    def run(self) -> None:
        while True:
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                os._exit(1)  # the launcher is gone (portable fallback of die_with_parent)
            with contextlib.suppress(OSError):
                self.write()
            time.sleep(self.interval)


_heartbeat: dict[str, _Heartbeat] = {}


def start_heartbeat(directory: str | os.PathLike, rank: int, interval: float, parent_pid: int | None = None) -> None:
    """Beat every `interval` seconds into `directory` from a daemon thread (first beat before returning)."""
    beat = _Heartbeat(Path(directory), rank, interval, parent_pid)
    beat.write()
    beat.start()
    _heartbeat["current"] = beat


def report_step(step: int) -> None:
    """Record the last completed step in this process's heartbeat (no-op without one)."""
    beat = _heartbeat.get("current")
    if beat is not None:
        beat.step = step


def write_record(directory: str | os.PathLike, name: str, record: dict[str, Any]) -> None:
    atomic_write(Path(directory) / name, json.dumps(record))


def read_record(path: str | os.PathLike) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError):
        return json.loads(Path(path).read_text())
    return None


def error_record(error: BaseException, config_error: bool, one_line: bool = False) -> dict[str, Any]:
    """What a worker writes when it fails: one-line config errors (rc 2) and one-line run errors
    such as a full disk (rc 1), full tracebacks otherwise."""
    short = config_error or one_line
    return {"config": config_error, "one_line": one_line,
            "message": str(error) if short else f"{type(error).__name__}: {error}",
            "traceback": "" if short else traceback.format_exc(), "time": time.time()}


# -- the launcher's side ---------------------------------------------------------------------------
class StallWatch:
    """Names ranks whose heartbeat file has not changed for `limit` seconds (launcher clock)."""

    def __init__(self, directory: str | os.PathLike, world: int, limit: float, startup_limit: float):
        self.directory, self.limit, self.startup_limit = Path(directory), limit, startup_limit
        self.started = time.monotonic()
        self.seen: dict[int, tuple[str, float]] = {}  # rank -> (file content, when it last changed)
        self.world = world

    def _poll(self, rank: int, now: float) -> dict[str, Any] | None:
        with contextlib.suppress(OSError):
            text = (self.directory / f"heartbeat_rank{rank}.json").read_text()
            if rank not in self.seen or self.seen[rank][0] != text:
                self.seen[rank] = (text, now)
        if rank not in self.seen:
            return None
        with contextlib.suppress(ValueError):
            return json.loads(self.seen[rank][0])
        return None

    def check(self, alive: list[int]) -> str | None:
        """A one-line description of the stalled rank(s) among `alive`, or None."""
        now = time.monotonic()
        beats = {r: self._poll(r, now) for r in range(self.world)}
        stale = [r for r in alive if r in self.seen and now - self.seen[r][1] > self.limit]
        silent = [r for r in alive if r not in self.seen and now - self.started > self.startup_limit]
        if silent:
            return (f"rank {silent[0]} never reported a heartbeat within {self.startup_limit:g} s of starting; "
                    "stopped all workers")
        if not stale:
            return None
        others = sorted({(b or {}).get("step", 0) for r, b in beats.items() if r not in stale})
        names = ", ".join(f"rank {r} (pid {(beats[r] or {}).get('pid', '?')}, last heartbeat at step "
                          f"{(beats[r] or {}).get('step', '?')})" for r in stale)
        waiting = (f"; the other ranks reached step {others[-1]} and wait for it" if others else "")
        age = max(now - self.seen[r][1] for r in stale)
        return (f"{names} stopped making progress: no heartbeat for {age:.0f} s (stall limit "
                f"{self.limit:g} s){waiting}; stopped all workers")


class SignalCatcher:
    """Context manager recording SIGTERM/SIGINT in the launcher (handlers restored on exit)."""

    def __init__(self):
        self.received: list[int] = []
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received.append(signum)

    def __enter__(self) -> "SignalCatcher":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._old[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, old in self._old.items():
            signal.signal(signum, old)


@dataclass
class Outcome:
    """How a supervised run ended: kind is done | stopped | stalled | failed."""

    kind: str
    signum: int = 0
    message: str = ""
    stop: dict[str, Any] | None = None
    errors: dict[int, dict[str, Any]] = field(default_factory=dict)
    exitcodes: list[int | None] = field(default_factory=list)
    first_failure: int | None = None  # rank that failed first (the likely root cause)
    seconds_to_stop: float | None = None  # from the first signal to the last worker's exit


def _kill(procs: list[Any]) -> None:
    for p in procs:
        if p.exitcode is None:
            with contextlib.suppress(OSError):
                os.kill(p.pid, signal.SIGKILL)
    for p in procs:
        p.join()


def supervise(procs: list[Any], control_dir: str | os.PathLike, signals: SignalCatcher, *, stall: float,
              startup_limit: float, stop_grace: float, poll: float = 0.2) -> Outcome:
    """Wait for the started worker processes (in rank order): forward signals, kill on a second
    signal or after `stop_grace`, kill everything 1 s after a worker fails or when a rank stalls.

    Returns once every worker has exited."""
    control_dir = Path(control_dir)
    watch = StallWatch(control_dir, len(procs), stall, startup_limit)
    forwarded, stop_started, failed_at, first_failure = 0, None, None, None
    outcome: Outcome | None = None
    while any(p.exitcode is None for p in procs):
        wait_sentinels([p.sentinel for p in procs if p.exitcode is None], timeout=poll)
        alive = [r for r, p in enumerate(procs) if p.exitcode is None]
        now = time.monotonic()
        if len(signals.received) > forwarded:
            if forwarded:  # a second signal: no more waiting
                outcome = Outcome("stopped", signals.received[0],
                                  f"second {signal_name(signals.received[-1])}: workers killed")
                break
            for r in alive:
                with contextlib.suppress(OSError):
                    os.kill(procs[r].pid, signals.received[0])
            forwarded, stop_started = len(signals.received), now
        if stop_started is not None and now - stop_started > stop_grace:
            outcome = Outcome("stopped", signals.received[0],
                              f"workers did not stop within {stop_grace:g} s and were killed")
            break
        if first_failure is None:
            first_failure = next((r for r, p in enumerate(procs) if p.exitcode not in (None, 0)), None)
            failed_at = now if first_failure is not None else None
        if failed_at is not None and now - failed_at > 1.0:
            break  # the others had a moment to report their own errors
        if stop_started is None and failed_at is None:
            stalled = watch.check(alive)
            if stalled:
                outcome = Outcome("stalled", message=stalled)
                break
    _kill(procs)
    if stop_started is not None:
        stop_started = time.monotonic() - stop_started
    errors = {r: rec for r in range(len(procs))
              if (rec := read_record(control_dir / f"error_rank{r}.json")) is not None}
    stop = read_record(control_dir / "stopped.json")
    if outcome is None:
        signum = (stop or {}).get("signal") or (signals.received[0] if signals.received else 0)
        if stop is not None:
            outcome = Outcome("stopped", signum)
        elif all(p.exitcode == 0 for p in procs):
            outcome = Outcome("done", signum)  # a signal during the last step: the run still finished
        elif signum:  # workers that died of the forwarded signal (before their handlers were up) or after it
            outcome = Outcome("stopped", signum, "the workers stopped before a step boundary")
        else:
            outcome = Outcome("failed")
    outcome.stop, outcome.errors, outcome.exitcodes = stop, errors, [p.exitcode for p in procs]
    outcome.first_failure, outcome.seconds_to_stop = first_failure, stop_started
    return outcome


# -- one run per output directory -----------------------------------------------------------------------
def _process_start(pid: int) -> str | None:
    """Start time of a process (Linux /proc clock ticks) to tell a live pid from a reused one."""
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _process_start(pid)
    return start is None or now is None or now == start


class RunLock:
    """``<out_dir>/seqpar.lock``: one run per output directory (see module doc)."""

    def __init__(self, out_dir: str | os.PathLike):
        self.path = Path(out_dir) / LOCK_NAME
        self.held = False
        self.note = ""

    def _record(self) -> str:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()),
                           "argv": sys.argv, "time": time.time()})

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(self._record())
        self.held = True
        return True

    def acquire(self) -> "RunLock":
        """Take the lock or raise ValueError naming the run that holds it; sets `note` on a takeover."""
        for _ in range(3):
            if self._create():
                return self
            owner = read_record(self.path)
            if owner is None:  # being written right now, or unreadable: look again
                time.sleep(0.2)
                owner = read_record(self.path)
            pid, host = (owner or {}).get("pid"), (owner or {}).get("host")
            if not isinstance(pid, int) or host != socket.gethostname() or _alive(pid, owner.get("start")):
                holder = f"pid {pid} on host {host}" if owner else "another run (unreadable lock)"
                raise ValueError(f"output directory {str(self.path.parent)!r} is in use by {holder} "
                                 f"(lock {str(self.path)!r}); pick another --out-dir, or delete the lock if that "
                                 "run is gone")
            if not self._take_over(owner):
                continue
            self.note = (f"seqpar train: note: took over the stale lock {str(self.path)!r} of pid {pid} "
                         f"(no longer running on {host})")
            return self
        raise ValueError(f"could not take the lock {str(self.path)!r}: other runs keep taking it")

    def _take_over(self, stale: dict[str, Any]) -> bool:
        """Replace a stale lock; a guard file keeps two takers from both winning."""
        guard = self.path.with_name(LOCK_NAME + ".takeover")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            with contextlib.suppress(OSError):
                if time.time() - guard.stat().st_mtime > 30:  # left by a taker that died
                    guard.unlink()
            time.sleep(0.2)
            return False
        try:
            os.close(fd)
            if read_record(self.path) == stale:
                self.path.unlink()
            return self._create()
        finally:
            with contextlib.suppress(OSError):
                guard.unlink()

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(OSError):
                if (read_record(self.path) or {}).get("pid") == os.getpid():
                    self.path.unlink()
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
