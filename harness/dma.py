"""DMA that outlives the crash: the sources, driven from the host.

`nic`  (realistic) An e1000e driven by the stock Linux driver in the first
       kernel, its receive ring enlarged to 4096 buffers, fed from the host over
       `-netdev dgram` (Unix datagram sockets) with frames of marker records from
       before the panic until the crash kernel is in userspace: 400/s while the
       first kernel's driver recycles buffers, 100/s after the panic. Nothing
       refills the ring then, so the NIC keeps writing into the old kernel's
       buffers until the ring is full: ~40 s, past the crash kernel's IOMMU
       initialisation even on a slow TCG host. When the ring is full QEMU stops
       taking frames; the source notes when (`ring_full_s`).

`edu`  (aimed) QEMU's `edu` device with a 64-bit DMA mask. `khdma` in the first
       kernel binds it to vfio-pci and maps chosen IOVAs (see csrc/guest/khdma.c).
       The host fires transfers through the qtest socket at four moments: before
       the panic, right after it (the old kernel is dead, kexec is starting), when
       the crash kernel's banner appears, and once the crash kernel is in
       userspace (its IOMMU initialised). Each transfer: the host writes 63
       marker records into the staging page (qtest, bypassing the IOMMU), edu
       reads them (staging IOVA == its physical address), then writes them to the
       target IOVA.

Every transfer is logged with its host time, so each marker found later can be
placed on the run's timeline.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import markers
from .deadline import Deadline
from .errors import DeadlineExceeded, HostError
from .markers import Source

log = logging.getLogger(__name__)

NIC_BDF = "00:04.0"
NIC_MAC = "52:54:00:6b:64:68"
EDU_BDF = "00:05.0"

ETHERTYPE = 0x88B5  # IEEE local experimental
RECORDS_PER_FRAME = 23  # 14 + 23*64 = 1486 bytes <= 1514
EDU_IDENT = 0x010000ED
EDU_BUF = 0x40000
EDU_BUF_SIZE = 4096
# QEMU 7.2's edu aborts unless buffer_addr + count < 0x41000 (strictly): 63 records.
EDU_COUNT = 63 * markers.RECORD_SIZE
EDU_SRC, EDU_DST, EDU_CNT, EDU_CMD = 0x80, 0x88, 0x90, 0x98
EDU_RUN, EDU_TO_RAM = 0x1, 0x2

PHASES = ("before_panic", "during_kexec", "crash_early", "crash_userspace")


@dataclass
class Transfer:
    seq: int
    t: float                  # seconds since the run started, when it was sent
    phase: str                # moment of the schedule it belongs to (PHASES)
    target: int | None = None  # IOVA (edu); None for NIC frames
    kind: str = "frame"
    fired: bool = True
    note: str = ""


class DmaSource:
    """Interface; the no-DMA source is this class itself."""

    name = "none"
    bdf: str | None = None
    needs_qtest = False

    def __init__(self) -> None:
        self.transfers: list[Transfer] = []
        self.run = None
        self.phase = "before_panic"
        self.errors: list[str] = []

    # QEMU and guest configuration
    def netdevs(self, scratch: Path) -> tuple[str, ...]:
        return ()

    def devices(self) -> tuple[str, ...]:
        return ()

    def guest_env(self) -> dict[str, str]:
        return {"KH_DMA": self.name}

    def first_append(self) -> tuple[str, ...]:
        """Options the first kernel needs for this source."""
        return ()

    def crash_append(self) -> tuple[str, ...]:
        """Options the next kernel needs for this source."""
        return ()

    # schedule, called by the run
    def attach(self, run) -> None:
        self.run = run

    def start(self) -> None:
        pass

    def pre_panic(self) -> None:
        pass

    def on_phase(self, phase: str) -> None:
        self.phase = phase

    def stop(self) -> None:
        pass

    def close(self) -> None:
        self.stop()

    def to_json(self) -> dict:
        return {"source": self.name}


class NicSource(DmaSource):
    name = "nic"
    bdf = NIC_BDF

    def __init__(self, rate: float = 400.0, rate_after_panic: float = 100.0, pre_panic_s: float = 2.0,
                 load_in_crash: bool = False):
        super().__init__()
        self.rate = rate
        self.rate_after_panic = rate_after_panic
        self.ring_full_t: float | None = None   # when QEMU first refused a frame (no free receive buffer)
        self.refused = 0
        self.pre_panic_s = pre_panic_s
        self.load_in_crash = load_in_crash
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.qemu_path: Path | None = None

    def netdevs(self, scratch: Path) -> tuple[str, ...]:
        host = scratch / "nic-h"
        self.qemu_path = scratch / "nic-q"
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.bind(str(host))
            self._sock.setblocking(False)
        return (f"dgram,id=nic0,local.type=unix,local.path={self.qemu_path},"
                f"remote.type=unix,remote.path={host}",)

    def devices(self) -> tuple[str, ...]:
        return (f"e1000e,netdev=nic0,mac={NIC_MAC},addr={NIC_BDF.split(':')[1]}",)

    def guest_env(self) -> dict[str, str]:
        return {"KH_DMA": "nic", "KH_NIC_MAC": NIC_MAC, "KH_FIRST_LOAD": "e1000e",
                "KH_CRASH_LOAD": "e1000e" if self.load_in_crash else ""}

    def crash_append(self) -> tuple[str, ...]:
        # MSI, not MSI-X, if the crash kernel loads e1000e (driver takeover): QEMU 7.2's e1000e
        # aborts (e1000e_core.c: e1000e_intrmgr_on_throttling_timer: !msix_enabled) when a driver
        # enables MSI-X while the ITR throttling timer is armed, and the crash kernel arms it
        # between enumeration (MSI-X off) and the probe: the old kernel's ITR value is still in
        # the device and its interrupts keep coming. The harness's insmod passes e1000e.* options
        # from the kernel's command line.
        return ("e1000e.IntMode=1",) if self.load_in_crash else ()

    def frame(self, seq: int, t_ns: int) -> bytes:
        dst = bytes.fromhex(NIC_MAC.replace(":", ""))
        hdr = dst + bytes.fromhex("020000000001") + struct.pack(">H", ETHERTYPE)
        return hdr + markers.transfer(self.run.nonce, Source.NIC, seq, 0, t_ns,
                                      RECORDS_PER_FRAME * markers.RECORD_SIZE)

    def _send_loop(self) -> None:
        seq = 0
        next_t = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now < next_t:
                self._stop.wait(next_t - now)
                continue
            t = self.run.now()
            try:
                self._sock.sendto(self.frame(seq, int(t * 1e9)), str(self.qemu_path))
                with self._lock:
                    self.transfers.append(Transfer(seq, t, self.phase))
            except BlockingIOError:
                # QEMU reads the socket only while the NIC has a free receive buffer
                self.refused += 1
                if self.ring_full_t is None:
                    self.ring_full_t = t
            except (FileNotFoundError, ConnectionRefusedError, OSError) as e:
                if len(self.errors) < 5:
                    self.errors.append(f"send failed at {t:.1f}s: {e}")
            seq += 1
            next_t += 1.0 / (self.rate if self.phase == "before_panic" else self.rate_after_panic)
            if next_t < now - 1:  # fell far behind (host busy): do not burst
                next_t = now

    def start(self) -> None:
        ev = self.run.machine.events.find("nic-ready")
        if ev is None or ev.fields.get("rc") != "0":
            raise HostError(f"the guest did not bring the NIC up: {ev.raw if ev else 'no nic-ready event'}")
        self._thread = threading.Thread(target=self._send_loop, name="nic-sender", daemon=True)
        self._thread.start()

    def pre_panic(self) -> None:
        # let the first kernel's driver receive (and recycle buffers) for a while
        self._stop.wait(self.pre_panic_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def close(self) -> None:
        self.stop()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def to_json(self) -> dict:
        with self._lock:
            tr = list(self.transfers)
        return {"source": self.name, "bdf": self.bdf, "rate_per_s": self.rate,
                "rate_after_panic_per_s": self.rate_after_panic, "frames": len(tr),
                "ring_full_s": self.ring_full_t, "refused": self.refused,
                "records_per_frame": RECORDS_PER_FRAME, "first_t": tr[0].t if tr else None,
                "last_t": tr[-1].t if tr else None, "errors": self.errors,
                "ring": self.run.machine.events.find("nic-ready").fields if self.run and self.run.machine
                and self.run.machine.events and self.run.machine.events.find("nic-ready") else None}


@dataclass
class EduTarget:
    iova: int
    kind: str              # buffer, crash-region, old-memory
    mapped: bool
    phys: int | None       # where a correct translation puts it (mapped ones)
    canary: int | None = None
    group: str = ""
    slot: int = 0          # which moment of the schedule (index in PHASES) writes it


class EduSource(DmaSource):
    name = "edu"
    bdf = EDU_BDF
    needs_qtest = True

    def __init__(self) -> None:
        super().__init__()
        self.targets: list[EduTarget] = []
        self.staging: int | None = None
        self.bar0: int | None = None
        self.iommu_present = False
        self.seq = 0

    def devices(self) -> tuple[str, ...]:
        return (f"edu,addr={EDU_BDF.split(':')[1]},dma_mask=0xffffffffffffffff",)

    def guest_env(self) -> dict[str, str]:
        env = {"KH_DMA": "edu", "KH_EDU_BDF": "0000:" + EDU_BDF, "KH_FIRST_LOAD": "vfio_iommu_type1 vfio_pci"}
        if self.run is not None and self.run.scenario.handover == "kexec":
            env["KH_FIRST_LOAD"] = ""  # no driver at all: see khdma edu-raw
        return env

    def first_append(self) -> tuple[str, ...]:
        # VFIO refuses an IOMMU without interrupt remapping (virtio-iommu) unless told; edu's
        # interrupts are never enabled here, so nothing is unsafe about it
        return ("vfio_iommu_type1.allow_unsafe_interrupts=1",)

    def start(self) -> None:
        ev_chan = self.run.machine.events
        try:
            ready = ev_chan.wait_for(("edu-ready", "error"), Deadline(60, "khdma to set up edu"),
                                     self.run.machine.alive)
        except DeadlineExceeded as e:
            raise HostError(f"edu set-up in the guest: {e}") from None
        if ready.name == "error":
            raise HostError(f"khdma failed in the guest: {ready.raw}")
        self.bar0 = ready.int("bar0")
        self.iommu_present = ready.fields.get("iommu") == "1"
        self.staging = ev_chan.find("edu-staging").int("iova")
        for ev in ev_chan.all("edu-target"):
            self.targets.append(EduTarget(
                iova=ev.int("iova"), kind=ev.fields["kind"], mapped=ev.fields["mapped"] == "1",
                phys=ev.int("phys") if ev.fields["mapped"] == "1" else None,
                canary=ev.int("canary"), group=ev.fields.get("group", ""), slot=ev.int("slot", 0)))
        ident = self.run.qtest.readl(self.bar0)
        if ident != EDU_IDENT:
            raise HostError(f"edu BAR0 at 0x{self.bar0:x} reads 0x{ident:x}, not the edu ident 0x{EDU_IDENT:x}")

    def pre_panic(self) -> None:
        self.fire_all()

    def on_phase(self, phase: str) -> None:
        super().on_phase(phase)
        self.fire_all()

    def fire_all(self) -> None:
        slot = PHASES.index(self.phase)
        for target in self.targets:
            if target.slot == slot:
                self.fire(target)

    def _edu_dma(self, src: int, dst: int, count: int, to_ram: bool) -> None:
        dev_addr = src if to_ram else dst
        # guard: QEMU 7.2 aborts on a device-side range outside [0x40000, 0x41000)
        if not (EDU_BUF <= dev_addr and 0 < count and dev_addr + count < EDU_BUF + EDU_BUF_SIZE):
            raise HostError(f"refusing an edu DMA of {count} bytes at device address 0x{dev_addr:x}: "
                            f"QEMU would abort")
        qt, bar = self.run.qtest, self.bar0
        if qt.readq(bar + EDU_CMD) & EDU_RUN:
            raise HostError("edu is still busy with the previous transfer")
        qt.writeq(bar + EDU_SRC, src)
        qt.writeq(bar + EDU_DST, dst)
        qt.writeq(bar + EDU_CNT, count)
        qt.writeq(bar + EDU_CMD, EDU_RUN | (EDU_TO_RAM if to_ram else 0))
        # edu completes 100 ms of virtual time later; nothing to wait on but the register
        deadline = Deadline(5, "edu to finish a DMA")
        time.sleep(0.1)
        while qt.readq(bar + EDU_CMD) & EDU_RUN:
            if deadline.expired():
                raise deadline.exceeded()
            time.sleep(0.01)

    def fire(self, target: EduTarget) -> None:
        seq = self.seq
        self.seq += 1
        t = self.run.now()
        tr = Transfer(seq, t, self.phase, target=target.iova, kind=target.kind)
        self.transfers.append(tr)
        try:
            ident = self.run.qtest.readl(self.bar0)
            if ident != EDU_IDENT:
                tr.fired, tr.note = False, f"edu BAR0 not decoding (read 0x{ident:x})"
                return
            data = markers.transfer(self.run.nonce, Source.EDU, seq, target.iova, int(t * 1e9), EDU_COUNT)
            self.run.qtest.write_memory(self.staging, data)
            try:
                self._edu_dma(self.staging, EDU_BUF, EDU_COUNT, to_ram=False)
            finally:  # the staging page must not look like a landing place
                self.run.qtest.write_memory(self.staging, bytes(EDU_COUNT))
            self._edu_dma(EDU_BUF, target.iova, EDU_COUNT, to_ram=True)
        except (HostError, DeadlineExceeded) as e:
            tr.fired, tr.note = False, str(e)
            if len(self.errors) < 5:
                self.errors.append(f"seq {seq}: {e}")

    def to_json(self) -> dict:
        return {"source": self.name, "bdf": self.bdf, "bar0": self.bar0, "staging": self.staging,
                "iommu_present": self.iommu_present, "targets": [asdict(t) for t in self.targets],
                "transfers": [asdict(t) for t in self.transfers], "errors": self.errors}


SOURCES = {"none": DmaSource, "nic": NicSource, "edu": EduSource}


def make_source(name: str, **kw) -> DmaSource:
    from .errors import UsageError
    try:
        cls = SOURCES[name]
    except KeyError:
        raise UsageError(f"unknown DMA source {name!r}; choose one of: {', '.join(SOURCES)}") from None
    return cls(**kw)
