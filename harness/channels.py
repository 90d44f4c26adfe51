"""Byte streams out of QEMU: the serial console and the harness's results port.

QEMU connects to a Unix socket the harness listens on. A pump thread reads the
socket from the moment QEMU connects, so the guest never blocks on a full socket
buffer, and writes every byte to a log file as it arrives. Consumers wait on what
the pump collected:

* `ConsoleSpawn` is a pexpect spawn over the console, for `expect()` with a
  deadline and for handing the console to a person (`interact()`).
* `EventChannel` parses the results port's line protocol (`event key=value ...`)
  into `Event`s with host timestamps.
"""

from __future__ import annotations

import bisect
import logging
import os
import queue
import select
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import pexpect
from pexpect.spawnbase import SpawnBase

from .deadline import Deadline
from .errors import HostError, MachineExited

log = logging.getLogger(__name__)

TAIL_BYTES = 16384


class Listener:
    """A listening Unix socket QEMU connects to as a client (`-chardev socket,path=...`
    without `server=on`), so nothing QEMU writes before we look is lost."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(str(self.path))
            self.sock.listen(1)
        except OSError as e:
            self.sock.close()
            raise HostError(f"cannot listen on {self.path}: {e}") from None

    def accept(self, deadline: Deadline, alive: Callable[[], bool]) -> socket.socket:
        while True:
            r, _, _ = select.select([self.sock], [], [], min(0.2, deadline.remaining()))
            if r:
                conn, _ = self.sock.accept()
                return conn
            if not alive():
                raise HostError(f"QEMU exited before connecting to {self.path.name}")
            deadline.check()

    def close(self) -> None:
        self.sock.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


class _Pump(threading.Thread):
    """Reads a socket until EOF; every chunk goes to the log file, then to `sink`."""

    def __init__(self, name: str, sock: socket.socket, logfile: Path, sink: Callable[[bytes | None], None]):
        super().__init__(name=f"pump-{name}", daemon=True)
        self.sock = sock
        self.log = open(logfile, "wb", buffering=0)
        self.sink = sink
        self.tail: deque[bytes] = deque()
        self._tail_len = 0
        self.eof = threading.Event()
        self.received = 0
        # (byte offset where a chunk ends, time.monotonic() it arrived): when a line came
        self.arrivals: list[tuple[int, float]] = []

    def run(self) -> None:
        try:
            while True:
                try:
                    data = self.sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    break
                self.log.write(data)
                self.received += len(data)
                self.arrivals.append((self.received, time.monotonic()))
                self.tail.append(data)
                self._tail_len += len(data)
                while self._tail_len - len(self.tail[0]) > TAIL_BYTES:
                    self._tail_len -= len(self.tail.popleft())
                self.sink(data)
        finally:
            self.log.close()
            try:
                self.sock.close()
            except OSError:
                pass
            self.eof.set()
            self.sink(None)

    def time_of(self, offset: int) -> float | None:
        """When the byte at `offset` of the log arrived (time.monotonic())."""
        i = bisect.bisect_right([end for end, _ in self.arrivals], offset)
        return self.arrivals[i][1] if i < len(self.arrivals) else None

    def tail_text(self, nbytes: int = 4096) -> str:
        return b"".join(self.tail)[-nbytes:].decode("utf-8", "replace")


class ConsoleSpawn(SpawnBase):
    """pexpect over the console socket, fed by a pump thread (never blocks QEMU)."""

    def __init__(self, sock: socket.socket, logfile: Path, name: str = "console"):
        super().__init__(timeout=30, maxread=65536, searchwindowsize=None, encoding="utf-8", codec_errors="replace")
        self.crlf = "\r\n"
        self._sock = sock
        self._queue: queue.Queue[bytes | None] = queue.Queue()
        self._eof_seen = False
        self.pump = _Pump(name, sock, logfile, self._queue.put)
        self.pump.start()
        self.closed = False

    def read_nonblocking(self, size: int = 1, timeout: float | None = -1) -> str:
        if self._eof_seen:
            self.flag_eof = True
            raise pexpect.EOF("console closed")
        if timeout == -1:
            timeout = self.timeout
        chunks: list[bytes] = []
        try:
            first = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise pexpect.TIMEOUT("no console output") from None
        if first is None:
            self._eof_seen = True
            self.flag_eof = True
            raise pexpect.EOF("console closed")
        chunks.append(first)
        while True:  # drain whatever else is already there
            try:
                more = self._queue.get_nowait()
            except queue.Empty:
                break
            if more is None:
                self._queue.put(None)
                break
            chunks.append(more)
        text = self._decoder.decode(b"".join(chunks), final=False)
        self._log(text, "read")
        return text

    def expect_within(self, patterns, deadline: Deadline):
        """`expect()` bounded by `deadline`; raises DeadlineExceeded naming what was awaited."""
        try:
            return self.expect(patterns, timeout=max(0.01, deadline.remaining()))
        except pexpect.TIMEOUT:
            raise deadline.exceeded(f"console tail: {self.tail_line()!r}") from None
        except pexpect.EOF:
            raise MachineExited(deadline.what, None, self.tail_line()) from None

    def skip_pending(self) -> None:
        """Forget console output so far: the next expect() sees only what comes next."""
        while True:
            try:
                self.read_nonblocking(self.maxread, 0)
            except pexpect.TIMEOUT:
                break
            except pexpect.EOF:
                break
        self.buffer = self.string_type()

    def tail_line(self) -> str:
        lines = [l for l in self.pump.tail_text(2048).splitlines() if l.strip()]
        return lines[-1][-160:] if lines else ""

    def send(self, s) -> int:
        b = s.encode() if isinstance(s, str) else s
        self._sock.sendall(b)
        return len(b)

    def sendline(self, s: str = "") -> int:
        return self.send(s + "\n")

    def interact_raw(self, escape: bytes = b"\x1d", until: Callable[[], bool] | None = None) -> None:
        """Hand the console to the person at this terminal until they press Ctrl-]
        or `until()` turns true.

        The pump keeps logging; what it reads is shown on stdout as it comes."""
        import termios
        import tty

        fd = sys.stdin.fileno()
        old = termios.tcgetattr(fd) if os.isatty(fd) else None
        try:
            if old is not None:
                tty.setraw(fd)
            while True:
                try:
                    data = self._queue.get(timeout=0.05)
                except queue.Empty:
                    data = b""
                if data is None:
                    return
                if data:
                    os.write(sys.stdout.fileno(), data)
                elif until is not None and until():
                    return
                r, _, _ = select.select([fd], [], [], 0)
                if r:
                    keys = os.read(fd, 1024)
                    if not keys or escape in keys:
                        return
                    self._sock.sendall(keys)
        finally:
            if old is not None:
                termios.tcsetattr(fd, termios.TCSADRAIN, old)


@dataclass(frozen=True)
class Event:
    """One line from the guest's results port: `name key=value ...`."""

    name: str
    fields: dict[str, str]
    t: float  # host time.monotonic() when the line arrived
    raw: str = field(repr=False, default="")

    def int(self, key: str, default: int | None = None) -> int | None:
        v = self.fields.get(key)
        if v is None:
            return default
        return int(v, 0)


def parse_event_line(line: str, t: float) -> Event | None:
    parts = line.strip().split()
    if not parts:
        return None
    fields = {}
    for p in parts[1:]:
        k, sep, v = p.partition("=")
        if sep:
            fields[k] = v
    return Event(parts[0], fields, t, line.rstrip("\n"))


class EventChannel:
    """The guest's results port: a line protocol the guest init scripts speak."""

    def __init__(self, sock: socket.socket, logfile: Path, name: str = "results"):
        self.events: list[Event] = []
        self._cond = threading.Condition()
        self._partial = b""
        self.closed = False
        self.pump = _Pump(name, sock, logfile, self._feed)
        self.pump.start()

    def _feed(self, data: bytes | None) -> None:
        with self._cond:
            if data is None:
                self.closed = True
            else:
                self._partial += data
                *lines, self._partial = self._partial.split(b"\n")
                now = time.monotonic()
                for line in lines:
                    ev = parse_event_line(line.decode("utf-8", "replace"), now)
                    if ev:
                        log.debug("event %s", ev.raw)
                        self.events.append(ev)
            self._cond.notify_all()

    def find(self, name: str, since: int = 0) -> Event | None:
        with self._cond:
            for ev in self.events[since:]:
                if ev.name == name:
                    return ev
        return None

    def all(self, name: str) -> list[Event]:
        with self._cond:
            return [ev for ev in self.events if ev.name == name]

    def send(self, line: str) -> None:
        """A line to the guest (it reads the port as its fd 3)."""
        try:
            self.pump.sock.sendall(line.encode() + b"\n")
        except OSError as e:
            raise MachineExited(f"the guest to read {line!r}", None, str(e)) from None

    def position(self) -> int:
        """A bookmark: pass it as `since` to wait only for events that come later."""
        with self._cond:
            return len(self.events)

    def wait_for(self, names: Iterable[str], deadline: Deadline, alive: Callable[[], bool] | None = None,
                 since: int = 0) -> Event:
        """Wait for the first event (after bookmark `since`) whose name is in `names`."""
        names = set(names)
        seen = since
        with self._cond:
            while True:
                for ev in self.events[seen:]:
                    if ev.name in names:
                        return ev
                seen = len(self.events)
                if self.closed or (alive is not None and not alive()):
                    raise MachineExited(" or ".join(sorted(names)), None)
                if deadline.expired():
                    raise deadline.exceeded()
                self._cond.wait(timeout=min(0.5, deadline.remaining()) or 0.01)
