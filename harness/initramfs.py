"""Initramfs images built from the recipes in guest-images/initramfs/.

A recipe is a list of directives, one per line (`#` starts a comment):

    busybox                      /bin/busybox (static) and /bin/sh; applets are linked at boot
    binary HOSTPATH [DEST]       a host executable and the shared libraries `ldd` names
    script NAME DEST             a file from the recipe directory, mode 0755
    file HOSTPATH DEST           any host file, mode 0644
    modules LISTFILE             kernel modules with their dependencies (see *.modules)
    kernel-image DEST            the kernel under test's image
    nested RECIPE DEST           another recipe's image, as a file inside this one
    helper NAME DEST             a guest helper compiled from csrc/guest (static)

For a guest of another architecture (arm64 on an x86 host), `busybox` and
`binary` take programs from that architecture's Debian packages instead of the
host, with their libraries read from the ELF files (harness.debroot).

Images are reproducible newc archives (uid 0, mtime 0, sorted), uncompressed
(under TCG the guest would spend longer decompressing than the host spends
copying), cached by a hash of everything that goes in, and renamed into place.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .cache import cache_root, locked, stat_key, write_atomic
from .errors import HostError, UsageError
from .kernels import Kernel, ModuleIndex, module_bytes

log = logging.getLogger(__name__)

BUILDER_VERSION = "1"
RECIPE_DIR = Path(__file__).resolve().parent.parent / "guest-images" / "initramfs"


class CpioWriter:
    """A reproducible newc ("070701") cpio archive."""

    def __init__(self, out: BinaryIO):
        self.out = out
        self.ino = 1
        self.dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1,
               rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.lstrip("/")
        namez = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(namez), 0]
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.ino += 1
        self.out.write(hdr + namez)
        self.out.write(b"\0" * (-(len(hdr) + len(namez)) % 4))
        self.out.write(data)
        self.out.write(b"\0" * (-len(data) % 4))

    def mkdir(self, path: str) -> None:
        path = path.strip("/")
        if not path or path in self.dirs:
            return
        self.mkdir(os.path.dirname(path))
        self.dirs.add(path)
        self._entry(path, stat.S_IFDIR | 0o755, nlink=2)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self.mkdir(os.path.dirname(path.strip("/")))
        self._entry(path, stat.S_IFREG | mode, data)

    def symlink(self, path: str, target: str) -> None:
        self.mkdir(os.path.dirname(path.strip("/")))
        self._entry(path, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self.mkdir(os.path.dirname(path.strip("/")))
        self._entry(path, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> None:
        self._entry("TRAILER!!!", 0, nlink=1)
        self.out.write(b"\0" * (-self.out.tell() % 512))


def cpio_bytes(files: dict[str, bytes], mode: int = 0o644) -> bytes:
    """A small archive of regular files (per-run settings appended to an image)."""
    buf = io.BytesIO()
    w = CpioWriter(buf)
    for name in sorted(files):
        w.file(name, files[name], mode)
    w.finish()
    return buf.getvalue()


@dataclass(frozen=True)
class Directive:
    verb: str
    args: tuple[str, ...]
    line: int


VERBS = {"busybox": (0, 0), "binary": (1, 2), "script": (2, 2), "file": (2, 2), "modules": (1, 1),
         "kernel-image": (1, 1), "nested": (2, 2), "helper": (2, 2)}


def parse_recipe(path: Path) -> list[Directive]:
    if not path.is_file():
        raise UsageError(f"recipe {path} does not exist")
    out = []
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        verb, *args = line.split()
        if verb not in VERBS:
            raise UsageError(f"{path}:{n}: unknown directive {verb!r} (known: {', '.join(VERBS)})")
        lo, hi = VERBS[verb]
        if not lo <= len(args) <= hi:
            raise UsageError(f"{path}:{n}: {verb} takes {lo}..{hi} arguments, got {len(args)}")
        out.append(Directive(verb, tuple(args), n))
    return out


def parse_module_list(path: Path) -> list[tuple[str, str, bool]]:
    """(module, when, optional) triples: when is "boot" or "ondemand"; an
    "optional" module may be missing from the kernel (it is then left out)."""
    out = []
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        when = parts[1] if len(parts) > 1 else "boot"
        if when not in ("boot", "ondemand") or parts[2:] not in ([], ["optional"]):
            raise UsageError(f"{path}:{n}: expected MODULE [boot|ondemand] [optional], got {line!r}")
        out.append((parts[0], when, parts[2:] == ["optional"]))
    return out


def shared_libraries(binary: Path) -> list[Path]:
    """The shared objects a host binary loads, the dynamic loader included (via ldd)."""
    try:
        r = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise HostError(f"ldd {binary}: {e}") from None
    if "not a dynamic executable" in (r.stdout + r.stderr):
        return []
    libs = []
    for line in r.stdout.splitlines():
        m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if m:
            libs.append(Path(m.group(1)))
    return libs


class Builder:
    """Builds one kernel's initramfs images from recipes, with caching."""

    def __init__(self, kernel: Kernel, recipe_dir: Path = RECIPE_DIR, helpers: dict[str, Path] | None = None,
                 userland=None):
        """`userland`: None for the host's own programs (a guest of the host's
        architecture), else a guest root of another architecture (debroot.GuestRoot):
        where `busybox` and `binary` find programs (`host_path`) and their libraries
        (`libraries`), plus what that architecture adds to every image: modules
        loaded at boot (`boot_modules`) and scripts installed in place of a binary,
        which moves to <path>.bin (`wrappers`: {guest path: script in recipe_dir})."""
        self.kernel = kernel
        self.recipe_dir = Path(recipe_dir)
        self.helpers = helpers or {}
        self.userland = userland
        self.boot_modules = tuple(userland.boot_modules) if userland is not None else ()
        self.wrappers = dict(userland.wrappers) if userland is not None else {}
        self._keys: dict[str, str] = {}

    def _program_path(self, p: str) -> Path:
        """A program (busybox, binary): the guest root's when the guest has one."""
        return self.userland.host_path(p) if self.userland is not None else self._host_path(p)

    def _host_path(self, p: str) -> Path:
        path = Path(p)
        if not path.exists():
            raise HostError(f"{p} is not on this host; run ci/setup.sh to install the guest tools")
        return path

    def key(self, name: str) -> str:
        """Content hash of a recipe and everything it pulls in (cheap: host
        binaries by path/size/mtime, the kernel by its identity)."""
        if name in self._keys:
            return self._keys[name]
        recipe = self.recipe_dir / f"{name}.recipe"
        h = hashlib.sha256()
        h.update(f"builder {BUILDER_VERSION}\nkernel {self.kernel.identity}\n".encode())
        if self.userland is not None:  # (host-userland keys stay what they were)
            h.update(f"arch {self.kernel.arch}\n{self.userland.key()}boot-modules {' '.join(self.boot_modules)}\n"
                     .encode())
            for dest, script in sorted(self.wrappers.items()):
                h.update(f"wrapper {dest}\n".encode() + (self.recipe_dir / script).read_bytes())
        h.update(recipe.read_bytes() if recipe.exists() else b"")
        for d in parse_recipe(recipe):
            if d.verb in ("script", "modules"):
                h.update((self.recipe_dir / d.args[0]).read_bytes())
            elif d.verb == "binary":
                h.update(stat_key(self._program_path(d.args[0])).encode())
            elif d.verb == "file":
                h.update(stat_key(self._host_path(d.args[0])).encode())
            elif d.verb == "busybox":
                h.update(stat_key(self._program_path("/bin/busybox")).encode())
            elif d.verb == "nested":
                h.update(self.key(d.args[0]).encode())
            elif d.verb == "helper":
                h.update(stat_key(self._helper(d.args[0])).encode())
        self._keys[name] = h.hexdigest()[:24]
        return self._keys[name]

    def _helper(self, name: str) -> Path:
        if name not in self.helpers:
            raise HostError(f"guest helper {name} was not built")
        return self.helpers[name]

    def build(self, name: str) -> Path:
        """Path of the cached image for recipe `name`, building it if needed."""
        out = cache_root() / "initramfs" / f"{name}-{self.kernel.release}-{self.key(name)}.cpio"
        if out.exists():
            return out
        with locked(out):
            if not out.exists():
                log.info("building initramfs %s for %s", name, self.kernel.release)
                buf = io.BytesIO()
                self._write(name, CpioWriter(buf))
                write_atomic(out, buf.getvalue())
        return out

    def _write(self, name: str, w: CpioWriter) -> None:
        for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc/kh", "proc", "sys", "dev", "tmp", "run", "lib/kh"):
            w.mkdir(d)
        w.chardev("dev/console", 5, 1)
        w.chardev("dev/null", 1, 3, 0o666)
        libs: set[Path] = set()
        foreign_libs: dict[str, Path] = {}   # guest path -> file in the guest root
        for d in parse_recipe(self.recipe_dir / f"{name}.recipe"):
            a = d.args
            if d.verb == "busybox":
                w.file("bin/busybox", self._program_path("/bin/busybox").read_bytes(), 0o755)
                w.symlink("bin/sh", "busybox")
            elif d.verb == "binary":
                src = self._program_path(a[0])
                dest = a[1] if len(a) > 1 else a[0]
                if dest in self.wrappers:
                    w.file(dest, (self.recipe_dir / self.wrappers[dest]).read_bytes(), 0o755)
                    dest += ".bin"
                w.file(dest, src.read_bytes(), 0o755)
                if self.userland is not None:
                    foreign_libs.update((so.guest_path, so.host_path) for so in self.userland.libraries(src))
                else:
                    libs.update(shared_libraries(src))
            elif d.verb == "script":
                w.file(a[1], (self.recipe_dir / a[0]).read_bytes(), 0o755)
            elif d.verb == "file":
                w.file(a[1], self._host_path(a[0]).read_bytes(), 0o644)
            elif d.verb == "kernel-image":
                w.file(a[0], self.kernel.image.read_bytes(), 0o644)
            elif d.verb == "nested":
                w.file(a[1], self.build(a[0]).read_bytes(), 0o644)
            elif d.verb == "helper":
                w.file(a[1], self._helper(a[0]).read_bytes(), 0o755)
            elif d.verb == "modules":
                self._modules(w, self.recipe_dir / a[0])
        for lib in sorted(libs):
            real = lib.resolve()
            w.file(str(lib), real.read_bytes(), 0o755)
        for guest in sorted(foreign_libs):
            w.file(guest, foreign_libs[guest].read_bytes(), 0o755)
        w.finish()

    def _modules(self, w: CpioWriter, listfile: Path) -> None:
        wanted = parse_module_list(listfile)
        if self.boot_modules:  # the architecture's own, first
            wanted = [(m, "boot", False) for m in self.boot_modules] + list(wanted)
        if self.kernel.modules_dir is None:
            # A user kernel without --modules: everything must be built in.
            w.file("etc/kh/boot-modules", b"")
            return
        index = ModuleIndex(self.kernel.modules_dir)
        written: set[Path] = set()
        boot = []
        for mod, when, optional in wanted:
            files = index.resolve([mod], optional={mod} if optional else frozenset())
            dests = []
            for f in files:
                dest = f"lib/modules/{f.name.split('.ko')[0]}.ko"
                if f not in written:
                    w.file(dest, module_bytes(f), 0o644)
                    written.add(f)
                dests.append("/" + dest)
            w.file(f"etc/kh/mod.{mod}", ("\n".join(dests) + "\n").encode())
            if when == "boot":
                boot.append(mod)
        w.file("etc/kh/boot-modules", ("\n".join(boot) + "\n").encode())


def with_settings(base: Path, settings: dict[str, bytes], out: Path) -> Path:
    """`base` followed by a small archive of per-run files (the kernel unpacks both)."""
    with open(out, "wb") as f, open(base, "rb") as b:
        shutil.copyfileobj(b, f, 1 << 20)
        f.write(cpio_bytes(settings))
    return out


def builder_for(kernel, recipe_dir: Path = RECIPE_DIR) -> "Builder":
    """The recipes' builder for `kernel`'s architecture: the host's own programs for
    a host-architecture guest, else that architecture's Debian packages (debroot)
    and cross-compiled helpers."""
    from .arch import arch_info
    from .guest_helpers import build_all

    a = arch_info(kernel.arch)
    helpers = build_all(a.name)
    if a.guest_packages is None:
        return Builder(kernel, recipe_dir, helpers=helpers)
    from .debroot import guest_root
    return Builder(kernel, recipe_dir, helpers=helpers, userland=guest_root(a))
