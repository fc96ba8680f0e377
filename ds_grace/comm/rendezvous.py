"""The start-up rendezvous: ranks meet in the launcher's store before any collective, so that a rank that
fails, or dies, before the handshake stops every other rank within seconds, naming it.

Under a launcher (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set, no process group yet) every rank joins
the torch.distributed TCPStore at MASTER_ADDR:MASTER_PORT first thing (rank 0 hosts it; the process group
is later built on this same store). Until the handshake each rank then:

- beats: a background thread adds 1 to its counter every ``beat_s`` and watches everyone's: a joined rank
  whose counter stands still for ``dead_after_s`` is lost (killed, or stopped by its node's launcher), a
  rank that has not joined ``join_timeout_s`` after this one did never came;
- publishes its own error (``fail``): "rank, host, error" goes into the store before the rank exits;
- waits for the others at ``wait_ready`` (all local checks passed), which raises PeerFailedError (the
  failed rank's input error, an input error here too) or PeerLostError (a crash, a rank lost or never
  come) naming the rank, its host and its error;
- before leaving with an error (``leave``), stays until every other rank has seen a failure (or is lost),
  so that the store, which lives in rank 0's process, outlives the news.

``join_startup()`` joins once per process (later calls return the same rendezvous until ``close``, which
the handshake calls); it returns None without a launcher or with a process group already up. The join
deadline defaults to 30 s (DS_GRACE_JOIN_TIMEOUT_S overrides it): ranks reach it right after their imports.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar

import torch.distributed as dist

from ds_grace.comm.collectives import DistributedSetupError

ENV_JOIN_TIMEOUT_S = "DS_GRACE_JOIN_TIMEOUT_S"
DEFAULT_JOIN_TIMEOUT_S = 30.0
_PREFIX = "ds_grace/start/"
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class PeerFailedError(DistributedSetupError):
    """Another rank refused its input before the handshake; this rank stops too (an input error)."""


class PeerLostError(RuntimeError):
    """Another rank crashed, was killed or never started before the handshake; this rank stops too."""


@dataclass(frozen=True)
class RankFailure:
    """One rank's published start-up error."""

    rank: int
    host: str
    error: str  # one line
    input_error: bool  # refused input (exit code 2), else a crash


def _one_line(text: str) -> str:
    return " ".join(text.split())


class StartupRendezvous:
    """Joined by every rank of a launch before its local checks; see the module doc."""

    _current: ClassVar[StartupRendezvous | None] = None  # the one of this process, until close()

    def __init__(
        self,
        store: Any,
        *,
        rank: int,
        world_size: int,
        address: str,
        join_timeout_s: float,
        beat_s: float = 0.5,
        dead_after_s: float = 10.0,
    ) -> None:
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.address = address
        self.host = socket.gethostname()
        self.join_timeout_s = join_timeout_s
        self.beat_s = beat_s
        self.dead_after_s = dead_after_s
        self._lock = threading.Lock()
        self._failures: list[RankFailure] = []  # published, in order seen
        self._lost: dict[int, str] = {}  # rank -> why it is counted lost
        self._beats: dict[int, tuple[int, float]] = {}  # rank -> (last counter, when it last changed)
        self._store_error: str | None = None
        self._published = False
        self._left = False
        self._joined_at = time.monotonic()
        self._stop = threading.Event()
        store.add(self._key("beat", rank), 1)  # before "host": a rank seen joined has a counter to read
        store.set(self._key("host", rank), self.host)
        # the watcher's own connection: it never waits behind the main thread
        self._watch_store = store.clone()
        self._thread = threading.Thread(target=self._watch, name="ds_grace-startup-beat", daemon=True)
        self._thread.start()

    # ---- joining ----

    @classmethod
    def join(
        cls,
        *,
        master_addr: str,
        master_port: int,
        rank: int,
        world_size: int,
        join_timeout_s: float = DEFAULT_JOIN_TIMEOUT_S,
        **timing: float,
    ) -> StartupRendezvous:
        """Open (rank 0) or reach the store at master_addr:master_port; PeerLostError when rank 0 opened
        none within join_timeout_s."""
        address = f"{master_addr}:{master_port}"
        try:
            store = dist.TCPStore(
                master_addr,
                master_port,
                world_size,
                is_master=rank == 0,
                timeout=timedelta(seconds=join_timeout_s),
                wait_for_workers=False,
            )
        except (RuntimeError, OSError) as exc:
            if rank == 0:
                raise DistributedSetupError(
                    f"rank 0 cannot open the rendezvous store at {address} (MASTER_ADDR:MASTER_PORT): "
                    f"{_one_line(str(exc))[:200]}"
                ) from None
            raise PeerLostError(
                f"rank 0 opened no rendezvous store at {address} (MASTER_ADDR:MASTER_PORT) within "
                f"{join_timeout_s:g} s: it failed or was stopped before it could start"
            ) from None
        return cls(
            store, rank=rank, world_size=world_size, address=address, join_timeout_s=join_timeout_s, **timing
        )

    @classmethod
    def current(cls) -> StartupRendezvous | None:
        return cls._current

    def _key(self, *parts: object) -> str:
        return _PREFIX + "/".join(str(p) for p in parts)

    # ---- the watcher thread ----

    def _watch(self) -> None:
        seen_failures = 0
        while not self._stop.is_set():
            try:
                self._watch_store.add(self._key("beat", self.rank), 1)
                seen_failures = self._read_failures(seen_failures)
                self._check_liveness()
                if self._failures or self._lost:
                    self._watch_store.set(self._key("seen", self.rank), "1")
            except Exception as exc:  # noqa: BLE001 - the store's host went away: that is the news
                with self._lock:
                    if self._store_error is None:
                        self._store_error = _one_line(str(exc))[:200]
                if self.rank != 0:
                    return
            self._stop.wait(self.beat_s)

    def _read_failures(self, seen: int) -> int:
        count = int(self._watch_store.add(self._key("failures"), 0))
        for index in range(seen, count):
            failure = RankFailure(**json.loads(self._watch_store.get(self._key("failure", index))))
            with self._lock:
                if all(known.rank != failure.rank for known in self._failures):
                    self._failures.append(failure)
        return count

    def _check_liveness(self) -> None:
        now = time.monotonic()
        others = [r for r in range(self.world_size) if r != self.rank]
        joined = [r for r in others if r in self._beats or self._watch_store.check([self._key("host", r)])]
        beats = self._watch_store.multi_get([self._key("beat", r) for r in joined]) if joined else []
        for rank, raw in zip(joined, beats):
            count = int(raw)
            last = self._beats.get(rank)
            if last is None or last[0] != count:
                self._beats[rank] = (count, now)
            elif now - last[1] > self.dead_after_s and not self._done(rank):
                self._mark_lost(rank, f"its heartbeat stopped for {self.dead_after_s:g} s (killed, or stopped "
                                "by its node's launcher)")  # fmt: skip
        if now - self._joined_at > self.join_timeout_s:
            for rank in others:
                if rank not in self._beats:
                    self._mark_lost(
                        rank,
                        f"it never joined the start-up rendezvous at {self.address} within "
                        f"{self.join_timeout_s:g} s (it failed before it could report, or never started)",
                    )

    def _done(self, rank: int) -> bool:
        return bool(self._watch_store.check([self._key("done", rank)]))

    def _mark_lost(self, rank: int, why: str) -> None:
        with self._lock:
            self._lost.setdefault(rank, why)

    # ---- what the main thread calls ----

    def fail(self, exc: BaseException, *, input_error: bool) -> None:
        """Publish this rank's own start-up error (once; a peer's failure seen here is not published)."""
        if self._published or isinstance(exc, (PeerFailedError, PeerLostError)):
            return
        self._published = True
        entry = {"rank": self.rank, "host": self.host, "error": _one_line(str(exc)) or type(exc).__name__,
                 "input_error": input_error}  # fmt: skip
        try:
            index = int(self.store.add(self._key("failure_slots"), 1)) - 1
            self.store.set(self._key("failure", index), json.dumps(entry))
            self.store.add(self._key("failures"), 1)
            self.store.set(self._key("seen", self.rank), "1")
        except Exception:  # noqa: BLE001 - the store is gone: the others learn from the lost heartbeat
            pass
        with self._lock:
            self._failures.append(RankFailure(**entry))

    def wait_ready(self) -> None:
        """This rank's local checks passed: wait until every rank's have, or raise PeerFailedError /
        PeerLostError naming the rank that failed, died or never came (after ``leave``)."""
        try:
            self.store.set(self._key("ready", self.rank), "1")
        except Exception as exc:  # noqa: BLE001
            self._note_store_error(exc)
        keys = [self._key("ready", r) for r in range(self.world_size)]
        while True:
            problem = self.problem()
            if problem is not None:
                self.leave()
                raise problem
            try:
                if self.store.check(keys):
                    return
            except Exception as exc:  # noqa: BLE001
                self._note_store_error(exc)
            time.sleep(0.05)

    def _note_store_error(self, exc: BaseException) -> None:
        with self._lock:
            if self._store_error is None:
                self._store_error = _one_line(str(exc))[:200]

    def failures(self) -> list[RankFailure]:
        with self._lock:
            return list(self._failures)

    def problem(self) -> PeerFailedError | PeerLostError | None:
        """The error this rank stops with, from what it has seen so far (a published failure first)."""
        with self._lock:
            failures, lost, store_error = list(self._failures), dict(self._lost), self._store_error
        others = sorted((f for f in failures if f.rank != self.rank), key=lambda f: f.rank)
        if others:
            first = others[0]
            more = sorted({f.rank for f in others[1:]})
            text = (
                f"rank {first.rank} (host {first.host}) failed before the start-up handshake: {first.error}"
                + (f" (ranks {', '.join(map(str, more))} failed too)" if more else "")
            )
            return PeerFailedError(text) if first.input_error else PeerLostError(text)
        if lost:
            rank = min(lost)
            return PeerLostError(f"rank {rank} was lost before the start-up handshake: {lost[rank]}")
        if store_error is not None and self.rank != 0:
            return PeerLostError(
                f"rank 0 (the rendezvous store at {self.address}) stopped answering before the start-up "
                f"handshake ({store_error})"
            )
        return None

    def leave(self) -> list[RankFailure]:
        """Before this rank exits with an error: stay until every other rank has seen a failure or is lost
        (at most the join deadline), so the store outlives the news; returns the failures seen."""
        if not self._left:
            self._left = True
            deadline = time.monotonic() + self.join_timeout_s
            with_news = [self._key("seen", r) for r in range(self.world_size)]
            while time.monotonic() < deadline:
                try:
                    self.store.set(self._key("done", self.rank), "1")
                    with self._lock:
                        lost = set(self._lost)
                    waiting = [k for r, k in enumerate(with_news) if r not in lost and r != self.rank]
                    if not waiting or all(self.store.check([k]) for k in waiting):
                        break
                except Exception:  # noqa: BLE001 - the store is gone: nobody is left to tell
                    break
                time.sleep(0.1)
            self.close()  # this rank exits next
        return self.failures()

    @property
    def closed(self) -> bool:
        """True once the handshake ran (or was reached): start-up errors are over."""
        return self._stop.is_set()

    def close(self) -> None:
        """The handshake is done: stop beating (the store stays, the process group uses it)."""
        self._stop.set()
        if threading.current_thread() is not self._thread:
            # a watcher still inside a store call while the interpreter exits aborts the process
            self._thread.join(timeout=max(5 * self.beat_s, 1.0))
        if StartupRendezvous._current is self:
            StartupRendezvous._current = None


def join_startup(env: Mapping[str, str] | None = None) -> StartupRendezvous | None:
    """This process's start-up rendezvous: joined on the first call under a launcher (see the module doc);
    None without the launcher's variables or with a process group already up."""
    if StartupRendezvous._current is not None:
        return StartupRendezvous._current
    env = os.environ if env is None else env
    if dist.is_initialized() or not all(name in env for name in _LAUNCHER_ENV):
        return None
    try:
        rank, world_size, port = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["MASTER_PORT"])
    except ValueError:
        return None  # the local checks name the malformed variable
    if world_size <= 1 or not 0 <= rank < world_size:
        return None
    join_timeout_s = DEFAULT_JOIN_TIMEOUT_S
    if env.get(ENV_JOIN_TIMEOUT_S):
        try:
            join_timeout_s = float(env[ENV_JOIN_TIMEOUT_S])
        except ValueError:
            raise DistributedSetupError(
                f"environment variable {ENV_JOIN_TIMEOUT_S} ({env[ENV_JOIN_TIMEOUT_S]!r}) must be a number of seconds"
            ) from None
    startup = StartupRendezvous.join(
        master_addr=env["MASTER_ADDR"],
        master_port=port,
        rank=rank,
        world_size=world_size,
        join_timeout_s=join_timeout_s,
    )
    StartupRendezvous._current = startup
    return startup
