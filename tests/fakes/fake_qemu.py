#!/usr/bin/env python3
"""A stand-in for qemu-system-x86_64 in unit tests: it connects to the chardev
sockets the harness listens on, speaks just enough QMP, prints a console line
and a results event, and then does what FAKE_QEMU_MODE says:

  run      stay up until QMP quit (default)
  exit     exit with status 1 right away, after printing an error
  ignore   ignore QMP quit and SIGTERM, so only SIGKILL stops it
  abort    connect, then fail like a device model's assertion (SIGABRT)
  abort-late  the same, but its sockets close a second before the process is gone
"""
import json
import os
import re
import signal
import socket
import sys
import time

mode = os.environ.get("FAKE_QEMU_MODE", "run")
argv = sys.argv[1:]
if mode == "exit":
    print("qemu-system-x86_64: -device bogus: 'bogus' is not a valid device model name", file=sys.stderr)
    sys.exit(1)
if mode == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

paths = {}
for i, a in enumerate(argv):
    if a == "-chardev":
        m = re.match(r"socket,id=(\w+),path=(.*)", argv[i + 1])
        if m:
            paths[m.group(1)] = m.group(2).replace(",,", ",")
pidfile = os.environ.get("FAKE_QEMU_PIDFILE")
if pidfile:
    with open(pidfile, "w") as f:
        f.write(str(os.getpid()))

socks = {}
for name in ("qmp0", "con0", "res0"):
    if name in paths:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(paths[name])
        socks[name] = s

socks["con0"].sendall(b"[    0.000000] Linux version 6.1.0-fake\r\nfake console ready\r\n")
if "res0" in socks:
    socks["res0"].sendall(b"boot role=first release=6.1.0-fake\n")

if mode == "abort-late":
    q = socks["qmp0"]
    q.sendall(b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, '
              b'"capabilities": []}}\r\n')
    while b"qmp_capabilities" not in q.recv(4096):
        pass
    q.sendall(b'{"return": {}}\r\n')
    time.sleep(0.5)
    print("qemu-system-x86_64: ../hw/net/e1000e_core.c:143: e1000e_intrmgr_on_throttling_timer: Assertion "
          "`!msix_enabled(timer->core->owner)' failed.", file=sys.stderr, flush=True)
    for sock in socks.values():
        sock.close()
    time.sleep(1.5)
    os.abort()

if mode == "abort":
    time.sleep(0.2)
    print("qemu-system-x86_64: ../hw/net/e1000e_core.c:1234: e1000e_fake: Assertion `x' failed.", file=sys.stderr,
          flush=True)
    os.abort()

qmp = socks["qmp0"]
qmp.sendall(json.dumps({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},
                                "capabilities": []}}).encode() + b"\r\n")
buf = b""
while True:
    data = qmp.recv(4096)
    if not data:
        if mode == "ignore":
            while True:
                time.sleep(1)
        sys.exit(0)
    buf += data
    while b"\n" in buf or buf.strip().endswith(b"}"):
        line, _, buf = buf.partition(b"\n") if b"\n" in buf else (buf, b"", b"")
        if not line.strip():
            continue
        msg = json.loads(line)
        reply = {"return": {}}
        if "id" in msg:
            reply["id"] = msg["id"]
        qmp.sendall(json.dumps(reply).encode() + b"\r\n")
        if msg.get("execute") == "quit" and mode != "ignore":
            sys.exit(0)
