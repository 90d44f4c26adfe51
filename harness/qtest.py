"""The qtest protocol, from the host, beside a running accelerator.

QEMU started with `-qtest unix:PATH` connects to PATH (the harness listens) and
executes line commands at any moment, whatever the vCPUs are doing:
`readq ADDR`, `writeq ADDR VALUE` (MMIO through the CPU's address space) and
`b64write ADDR SIZE DATA` (guest-physical memory, bypassing any IOMMU). Every
command has a deadline.
"""

from __future__ import annotations

import base64
import select
import socket
import threading

from .deadline import Deadline
from .errors import DeadlineExceeded, HostError


class QtestError(HostError):
    pass


class Qtest:
    def __init__(self, sock: socket.socket, log_path=None):
        self.sock = sock
        self._buf = b""
        self._lock = threading.Lock()
        self._log = open(log_path, "w") if log_path else None

    def _cmd(self, line: str, seconds: float = 5.0) -> str:
        with self._lock:
            if self._log:
                self._log.write(f"> {line}\n" if len(line) < 200 else f"> {line[:200]}...\n")
            try:
                self.sock.sendall(line.encode() + b"\n")
            except OSError as e:
                raise QtestError(f"qtest socket closed ({e}): QEMU has exited") from None
            deadline = Deadline(seconds, f"qtest reply to {line.split()[0]}", scale=1)
            while True:
                while b"\n" in self._buf:
                    reply, _, self._buf = self._buf.partition(b"\n")
                    text = reply.decode("ascii", "replace")
                    if text.startswith("IRQ"):  # interrupt intercept notices, not replies
                        continue
                    if self._log:
                        self._log.write(f"< {text}\n")
                    if text.startswith("OK"):
                        return text[2:].strip()
                    raise QtestError(f"qtest {line.split()[0]} failed: {text}")
                r, _, _ = select.select([self.sock], [], [], deadline.remaining())
                if not r:
                    raise DeadlineExceeded(deadline.what, seconds)
                data = self.sock.recv(4096)
                if not data:
                    raise QtestError("qtest socket closed: QEMU has exited")
                self._buf += data

    def readq(self, addr: int) -> int:
        return int(self._cmd(f"readq 0x{addr:x}"), 16)

    def readl(self, addr: int) -> int:
        return int(self._cmd(f"readl 0x{addr:x}"), 16)

    def writeq(self, addr: int, value: int) -> None:
        self._cmd(f"writeq 0x{addr:x} 0x{value:x}")

    def write_memory(self, addr: int, data: bytes) -> None:
        self._cmd(f"b64write 0x{addr:x} 0x{len(data):x} {base64.b64encode(data).decode()}")

    def close(self) -> None:
        try:
            self.sock.close()
        finally:
            if self._log:
                self._log.close()
