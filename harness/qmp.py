"""A small synchronous face on `qemu.qmp.QMPClient`, where every call has a deadline.

The harness is synchronous; qemu.qmp is asyncio. `Qmp` runs its own event loop
and bounds every await with `asyncio.wait_for`. QMP command failures keep QEMU's
`error_class` (`QmpCommandError.error_class`).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from qemu.qmp import ExecuteError, QMPClient

from .errors import DeadlineExceeded, HostError


class QmpCommandError(HostError):
    def __init__(self, command: str, error_class: str, desc: str):
        self.command = command
        self.error_class = error_class
        super().__init__(f"QMP {command} failed: {error_class}: {desc}")


class Qmp:
    def __init__(self, name: str):
        self.name = name
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(name)
        self.timeout = 30.0

    def _run(self, coro, timeout: float, what: str):
        try:
            return self._loop.run_until_complete(asyncio.wait_for(coro, timeout))
        except asyncio.TimeoutError:
            raise DeadlineExceeded(what, timeout) from None

    def connect(self, sock: socket.socket, timeout: float) -> None:
        """Negotiate on a socket QEMU already connected (we listened, QEMU dialled)."""
        try:
            self._run(self._client.connect(sock), timeout, "the QMP greeting")
        except DeadlineExceeded:
            raise
        except Exception as e:
            raise HostError(f"QMP negotiation failed: {type(e).__name__}: {e}") from None

    def cmd(self, command: str, timeout: float | None = None, **args: Any) -> Any:
        try:
            return self._run(self._client.execute(command, args or None), timeout or self.timeout,
                             f"QMP {command} to return")
        except ExecuteError as e:
            raise QmpCommandError(command, e.error_class, str(e)) from None

    def events(self) -> list[dict]:
        """Every event QEMU sent so far that nobody has taken yet."""
        out = []
        q = self._client.events
        while True:
            try:
                ev = self._loop.run_until_complete(asyncio.wait_for(q.get(), 0.001))
            except asyncio.TimeoutError:
                return out
            out.append(dict(ev))

    def close(self) -> None:
        try:
            self._loop.run_until_complete(asyncio.wait_for(self._client.disconnect(), 5))
        except Exception:
            pass
        finally:
            self._loop.close()
