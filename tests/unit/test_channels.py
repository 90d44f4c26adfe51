import socket
import threading
import time

import pytest

from harness.channels import ConsoleSpawn, EventChannel, parse_event_line
from harness.deadline import Deadline
from harness.errors import DeadlineExceeded, MachineExited


def test_parse_event_line():
    ev = parse_event_line("armed rc=0 loaded=1\n", 1.0)
    assert ev.name == "armed" and ev.fields == {"rc": "0", "loaded": "1"} and ev.int("rc") == 0
    assert parse_event_line("   \n", 0) is None


def test_events_arrive_in_order_and_bookmarks_skip_old_ones(tmp_path):
    a, b = socket.socketpair()
    ch = EventChannel(b, tmp_path / "r.log")
    a.sendall(b"boot role=first\nready\n")
    assert ch.wait_for(["ready"], Deadline(5, "ready")).name == "ready"
    mark = ch.position()
    a.sendall(b"boot role=cr")  # a line split across writes
    time.sleep(0.05)
    a.sendall(b"ash\n")
    ev = ch.wait_for(["boot"], Deadline(5, "crash boot"), since=mark)
    assert ev.fields["role"] == "crash"
    a.close()
    ch.pump.join(5)
    assert (tmp_path / "r.log").read_bytes() == b"boot role=first\nready\nboot role=crash\n"


def test_event_deadline_names_what_it_waited_for(tmp_path):
    a, b = socket.socketpair()
    ch = EventChannel(b, tmp_path / "r.log")
    with pytest.raises(DeadlineExceeded, match="waiting for the crash kernel"):
        ch.wait_for(["captured"], Deadline(0.3, "the crash kernel", scale=1))
    a.close()


def test_event_wait_ends_when_the_port_closes(tmp_path):
    a, b = socket.socketpair()
    ch = EventChannel(b, tmp_path / "r.log")
    threading.Timer(0.2, a.close).start()
    with pytest.raises(MachineExited):
        ch.wait_for(["captured"], Deadline(30, "capture"))


def test_console_expect_and_deadline(tmp_path):
    a, b = socket.socketpair()
    con = ConsoleSpawn(b, tmp_path / "c.log")
    a.sendall(b"[    0.000000] Linux version 6.1\r\nRun /init as init process\r\n")
    con.expect_within([r"Run /init"], Deadline(5, "init"))
    con.skip_pending()
    with pytest.raises(DeadlineExceeded, match="the crash kernel's banner"):
        con.expect_within([r"Linux version"], Deadline(0.3, "the crash kernel's banner", scale=1))
    a.sendall(b"echo\n")
    con.sendline("hello")
    assert a.recv(100) == b"hello\n"
    a.close()
    with pytest.raises(MachineExited):
        con.expect_within(["never"], Deadline(5, "never"))


def test_console_pump_never_blocks_the_writer(tmp_path):
    """Nobody calls expect(): the writer must still be able to write megabytes."""
    a, b = socket.socketpair()
    con = ConsoleSpawn(b, tmp_path / "c.log")
    a.settimeout(10)
    a.sendall(b"x" * (8 << 20))
    a.close()
    con.pump.join(10)
    assert (tmp_path / "c.log").stat().st_size == 8 << 20


def test_console_knows_when_each_byte_arrived(tmp_path):
    a, b = socket.socketpair()
    con = ConsoleSpawn(b, tmp_path / "c.log")
    a.sendall(b"first\n")
    con.expect_within(["first"], Deadline(5, "first"))
    time.sleep(0.3)
    a.sendall(b"second\n")
    con.expect_within(["second"], Deadline(5, "second"))
    t_first, t_second = con.pump.time_of(0), con.pump.time_of(7)
    assert t_first is not None and t_second is not None and t_second > t_first
    assert con.pump.time_of(1000) is None
    a.close()
