"""The Debian guest image of `--guest debian`, built from guest-images/debian/.

    image = build_image(kernel, progress=progress)   # cached; minutes the first time
    image.rootfs, image.initrd, image.key_path, image.cmdline

The build, as root, without loop mounts:

1. `debootstrap --variant=minbase --include=<packages>` a Debian 12 tree (the
   downloaded packages are kept in the cache for the next build);
2. copy the recipe's overlay (`files/`) and the kernel under test (image,
   config, modules, from the unpacked package in the kernel cache) into it;
3. generate the harness user's SSH key (ed25519) and run the recipe's
   `setup.sh RELEASE` in the chroot: the user, the services, and what
   installing a kernel package runs (/etc/kernel/postinst.d: initramfs-tools
   builds the first kernel's initrd, kdump-tools its crash initrd);
4. `mkfs.ext4 -d TREE` turns the tree into a (sparse) file system image.

The image directory (rootfs.img, the first kernel's initrd, the key, the
guest's SSH host key, manifest.json) is named by a hash of every recipe file
and the kernel's identity, built under a lock and renamed into place whole, so
a reader never sees half an image and a recipe or kernel change builds anew.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .cache import build_dir, cache_root, locked
from .deadline import Deadline
from .errors import HostError, UsageError
from .kernels import Kernel

log = logging.getLogger(__name__)

BUILDER_VERSION = "1"
GUEST_IMAGES = Path(__file__).resolve().parent.parent / "guest-images"
GUESTS = ("debian",)

# recipe setting -> (minimum, maximum) number of values
SETTINGS = {"suite": (1, 1), "mirror": (1, 1), "variant": (1, 1), "packages": (1, 1), "overlay": (1, 1),
            "setup": (1, 1), "cmdline": (1, 1), "label": (1, 1), "size-mb": (1, 1), "user": (1, 1)}
REQUIRED = ("suite", "mirror", "packages", "setup", "cmdline", "label", "size-mb", "user")

# seconds, for the slowest step; the whole build takes a few minutes
BUILD_BUDGET = {"debootstrap": 1200.0, "setup": 900.0, "mkfs": 600.0}

ProgressFn = Callable[[str, str, str], None]


def _quiet(phase: str, status: str, detail: str) -> None:
    log.info("%s: %s %s", phase, status, detail)


def recipe_dir(guest: str) -> Path:
    if guest not in GUESTS:
        raise UsageError(f"unknown guest {guest!r}; the distro guests are: {', '.join(GUESTS)}")
    return GUEST_IMAGES / guest


def _lines(path: Path) -> list[str]:
    """Non-empty lines of a list file, comments (#) removed."""
    out = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


@dataclass(frozen=True)
class Recipe:
    dir: Path
    suite: str
    mirror: str
    variant: str
    packages: tuple[str, ...]
    overlay: Path | None
    setup: Path
    cmdline: tuple[str, ...]
    label: str
    size_mb: int
    user: str

    def files(self) -> list[Path]:
        """Every file of the recipe directory: they all go into the cache key."""
        return sorted(p for p in self.dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def parse_recipe(directory: Path) -> Recipe:
    """guest-images/<guest>/recipe: one `NAME VALUE` a line."""
    path = directory / "recipe"
    if not path.is_file():
        raise UsageError(f"recipe {path} does not exist")
    values: dict[str, list[str]] = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, *args = line.split()
        if name not in SETTINGS:
            raise UsageError(f"{path}:{n}: unknown setting {name!r} (known: {', '.join(SETTINGS)})")
        lo, hi = SETTINGS[name]
        if not lo <= len(args) <= hi:
            raise UsageError(f"{path}:{n}: {name} takes {lo if lo == hi else f'{lo} to {hi}'} value(s), "
                             f"got {len(args)}")
        if name in values:
            raise UsageError(f"{path}:{n}: {name} is set twice")
        values[name] = args
    missing = [r for r in REQUIRED if r not in values]
    if missing:
        raise UsageError(f"{path}: missing setting(s) {', '.join(missing)}")

    def file(name: str) -> Path:
        p = directory / values[name][0]
        if not p.exists():
            raise UsageError(f"{path}: {name} {values[name][0]}: {p} does not exist")
        return p

    try:
        size_mb = int(values["size-mb"][0])
    except ValueError:
        raise UsageError(f"{path}: size-mb {values['size-mb'][0]!r} is not a number") from None
    if size_mb < 1024:
        raise UsageError(f"{path}: size-mb {size_mb} is too small for a Debian system and a dump (>= 1024)")
    packages = tuple(_lines(file("packages")))
    cmdline = tuple(opt for line in _lines(file("cmdline")) for opt in line.split())
    overlay = file("overlay") if "overlay" in values else None
    if overlay is not None and not overlay.is_dir():
        raise UsageError(f"{path}: overlay {overlay} is not a directory")
    return Recipe(dir=directory, suite=values["suite"][0], mirror=values["mirror"][0],
                  variant=values.get("variant", ["minbase"])[0], packages=packages, overlay=overlay,
                  setup=file("setup"), cmdline=cmdline, label=values["label"][0], size_mb=size_mb,
                  user=values["user"][0])


def image_key(recipe: Recipe, kernel_identity: str) -> str:
    """The cache key: the builder, every recipe file (name and bytes), the kernel."""
    h = hashlib.sha256()
    h.update(f"builder {BUILDER_VERSION}\nkernel {kernel_identity}\n".encode())
    for p in recipe.files():
        h.update(f"file {p.relative_to(recipe.dir)} {p.stat().st_mode & 0o111:o}\n".encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:24]


@dataclass(frozen=True)
class DebianImage:
    """A built image directory in the cache."""

    dir: Path
    manifest: dict = field(compare=False, repr=False)

    @property
    def rootfs(self) -> Path:
        return self.dir / "rootfs.img"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    @property
    def key_path(self) -> Path:
        return self.dir / "id_ed25519"

    @property
    def host_key_path(self) -> Path:
        return self.dir / "ssh_host_ed25519_key.pub"

    @property
    def cmdline(self) -> tuple[str, ...]:
        return tuple(self.manifest["cmdline"])

    @property
    def user(self) -> str:
        return self.manifest["user"]

    @property
    def release(self) -> str:
        return self.manifest["kernel_release"]

    @classmethod
    def load(cls, directory: Path) -> "DebianImage":
        manifest = json.loads((directory / "manifest.json").read_text())
        return cls(directory, manifest)

    def complete(self) -> bool:
        return all(p.exists() for p in (self.rootfs, self.initrd, self.key_path, self.host_key_path))


def image_dir(recipe: Recipe, kernel: Kernel) -> Path:
    return cache_root() / "guest-images" / f"{recipe.dir.name}-{image_key(recipe, kernel.identity)}"


def build_image(kernel: Kernel, guest: str = "debian", *, progress: ProgressFn | None = None,
                recipe: Recipe | None = None) -> DebianImage:
    """The cached image for this recipe and kernel; built (minutes) when missing."""
    progress = progress or _quiet
    recipe = recipe or parse_recipe(recipe_dir(guest))
    final = image_dir(recipe, kernel)
    if (final / "manifest.json").exists():
        return DebianImage.load(final)
    if os.geteuid() != 0:
        raise HostError("building the Debian guest image needs root (debootstrap, chroot); run as root once, "
                        "then the cached image serves everyone")
    for tool, pkg in (("debootstrap", "debootstrap"), ("mkfs.ext4", "e2fsprogs"), ("chroot", "coreutils")):
        if shutil.which(tool) is None:
            raise HostError(f"{tool} not found: the Debian guest image needs it (apt-get install {pkg})")
    with locked(final):
        if (final / "manifest.json").exists():
            return DebianImage.load(final)
        t0 = time.monotonic()
        with build_dir(final) as tmp:
            tree = tmp / "root"
            try:
                steps = _build(recipe, kernel, tmp, tree, progress)
            finally:
                _unmount_under(tree)
                shutil.rmtree(tree, ignore_errors=True)
            manifest = {
                "builder_version": BUILDER_VERSION, "recipe": str(recipe.dir), "suite": recipe.suite,
                "packages": list(recipe.packages), "cmdline": list(recipe.cmdline), "label": recipe.label,
                "user": recipe.user, "kernel_identity": kernel.identity, "kernel_release": kernel.release,
                "build_seconds": {**steps, "total": round(time.monotonic() - t0, 1)},
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        progress("image", "done", f"{time.monotonic() - t0:.0f} s, {final.name}")
        return DebianImage.load(final)


def _build(recipe: Recipe, kernel: Kernel, out: Path, tree: Path, progress: ProgressFn) -> dict[str, float]:
    steps: dict[str, float] = {}

    def step(name: str, detail: str):
        progress("image", "start", f"{name}: {detail}")
        return time.monotonic()

    # 1. debootstrap
    t = step("debootstrap", f"Debian {recipe.suite} ({len(recipe.packages)} extra packages; a few minutes)")
    debs = cache_root() / "debootstrap" / recipe.suite
    debs.mkdir(parents=True, exist_ok=True)
    argv = ["debootstrap", f"--variant={recipe.variant}", f"--include={','.join(recipe.packages)}",
            f"--cache-dir={debs}", recipe.suite, str(tree), recipe.mirror]
    counter = DebootstrapProgress(lambda d: progress("image", "start", f"debootstrap: {d}"))
    run_streamed(argv, "debootstrap", Deadline(BUILD_BUDGET["debootstrap"], "debootstrap to build the tree"),
                 on_line=counter.line)
    steps["debootstrap"] = round(time.monotonic() - t, 1)

    # 2. overlay and kernel
    t = step("kernel", f"{kernel.release} and the recipe's files")
    if recipe.overlay is not None:
        copy_overlay(recipe.overlay, tree)
    install_kernel(kernel, tree)
    kh = tree / "tmp" / "kh"
    kh.mkdir(parents=True, exist_ok=True)
    private, public = generate_key(f"kdump-harness@{kernel.release}")
    (out / "id_ed25519").write_bytes(private)
    (out / "id_ed25519").chmod(0o600)
    (out / "id_ed25519.pub").write_bytes(public + b"\n")
    (kh / "authorized_keys").write_bytes(public + b"\n")
    shutil.copy2(recipe.setup, kh / "setup.sh")
    steps["kernel"] = round(time.monotonic() - t, 1)

    # 3. setup in the chroot (initramfs-tools and kdump-tools build their initrds here)
    t = step("setup", f"{recipe.setup.name} in the chroot (initrds for {kernel.release})")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LC_ALL": "C", "TERM": "dumb",
           "DEBIAN_FRONTEND": "noninteractive"}
    run_streamed(["chroot", str(tree), "/bin/sh", "/tmp/kh/setup.sh", kernel.release], "the recipe's setup",
                 Deadline(BUILD_BUDGET["setup"], "the recipe's setup.sh in the chroot"),
                 on_line=lambda l: progress("image", "start", f"setup: {l[:100]}") if l.startswith("setup:") else None,
                 env=env)
    initrd = tree / "boot" / f"initrd.img-{kernel.release}"
    if not initrd.is_file():
        raise HostError(f"the image build made no {initrd.relative_to(tree)} (see the log above)")
    shutil.copy2(initrd, out / "initrd.img")
    host_key = tree / "etc" / "ssh" / "ssh_host_ed25519_key.pub"
    if not host_key.is_file():
        raise HostError("openssh-server made no host key in the image")
    shutil.copy2(host_key, out / "ssh_host_ed25519_key.pub")
    steps["setup"] = round(time.monotonic() - t, 1)

    # 4. the file system, from the tree, no mount
    t = step("mkfs", f"ext4 {recipe.size_mb} MiB (sparse) from the tree")
    fs_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"kdump-harness:{out.name}"))
    run_streamed(["mkfs.ext4", "-q", "-F", "-L", recipe.label, "-U", fs_uuid, "-E", "root_owner=0:0",
                  "-d", str(tree), str(out / "rootfs.img"), f"{recipe.size_mb}M"], "mkfs.ext4",
                 Deadline(BUILD_BUDGET["mkfs"], "mkfs.ext4 -d to write the image"))
    steps["mkfs"] = round(time.monotonic() - t, 1)
    return steps


class DebootstrapProgress:
    """Turns debootstrap's `I: Retrieving ...` lines into a short summary, at most
    every `every` seconds."""

    STAGES = (("Retrieving", "retrieved"), ("Validating", "validated"), ("Extracting", "extracted"),
              ("Unpacking", "unpacked"), ("Configuring", "configured"))

    def __init__(self, report: Callable[[str], None], every: float = 10.0, clock=time.monotonic):
        self.report = report
        self.every = every
        self.clock = clock
        self.counts: dict[str, int] = {}
        self.last = clock()

    def line(self, line: str) -> None:
        for word, done in self.STAGES:
            if line.startswith(f"I: {word} "):
                self.counts[done] = self.counts.get(done, 0) + 1
                break
        else:
            return
        if self.clock() - self.last >= self.every:
            self.last = self.clock()
            self.report(self.summary())

    def summary(self) -> str:
        return ", ".join(f"{n} {what}" for what, n in self.counts.items()) + " packages"


def run_streamed(argv: list[str], what: str, deadline: Deadline, on_line: Callable[[str], None] | None = None,
                 env: dict | None = None) -> list[str]:
    """Run a build tool, its output line by line to the log (and `on_line`); the
    last lines go into the error when it fails or outlives `deadline`."""
    import selectors

    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    except FileNotFoundError:
        raise HostError(f"{argv[0]} not found: {what} needs it") from None
    tail: list[str] = []
    buf = b""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        while True:
            if deadline.expired():
                raise HostError(f"{what}: {deadline.exceeded()}; last output: {' | '.join(tail[-5:])}")
            if not sel.select(timeout=min(1.0, deadline.remaining())):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                line = raw.decode("utf-8", "replace").rstrip()
                log.debug("%s: %s", argv[0], line)
                tail = (tail + [line])[-40:]
                if on_line is not None:
                    on_line(line)
        rc = proc.wait(timeout=max(1.0, deadline.remaining()))
    except BaseException:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
            proc.wait()
        raise
    finally:
        sel.close()
        proc.stdout.close()
    if rc != 0:
        shown = " | ".join(l for l in tail[-8:] if l.strip())
        raise HostError(f"{what} failed (status {rc}): {' '.join(argv[:3])} ...: {shown}")
    return tail


def copy_overlay(src: Path, tree: Path) -> None:
    """The recipe's files over the tree, owned by root (the checkout's owner does not matter)."""
    for path in sorted(src.rglob("*")):
        dest = tree / path.relative_to(src)
        if path.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
            os.chown(dest, 0, 0)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest, follow_symlinks=False)
            os.chown(dest, 0, 0, follow_symlinks=False)


def install_kernel(kernel: Kernel, tree: Path) -> None:
    """The kernel under test into the tree, as its package would put it: image and
    config in /boot, modules in /lib/modules/<release>."""
    if kernel.modules_dir is None:
        raise UsageError("the Debian guest needs the kernel's modules (its initrd loads virtio and ext4): "
                         "give --modules with a kernel path")
    boot = tree / "boot"
    boot.mkdir(exist_ok=True)
    shutil.copyfile(kernel.image, boot / f"vmlinuz-{kernel.release}")
    if kernel.config_path is not None:
        shutil.copyfile(kernel.config_path, boot / f"config-{kernel.release}")
    system_map = kernel.image.parent / f"System.map-{kernel.release}"
    if system_map.is_file():
        shutil.copyfile(system_map, boot / f"System.map-{kernel.release}")
    lib = tree / "usr" / "lib" if (tree / "lib").is_symlink() else tree / "lib"
    dest = lib / "modules" / kernel.release
    if dest.exists():
        shutil.rmtree(dest)
    # build/ and source/ point into a kernel tree that is not in the image
    shutil.copytree(kernel.modules_dir, dest, symlinks=True, ignore=shutil.ignore_patterns("build", "source"))


def generate_key(comment: str) -> tuple[bytes, bytes]:
    """(OpenSSH private key, `ssh-ed25519 ... comment` public line)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b" " + comment.encode()


def _unmount_under(tree: Path) -> None:
    """debootstrap mounts /proc and /sys in the tree while it runs; an interrupted
    build must not leave them there (nor rmtree into them)."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return
    prefix = str(tree.resolve()) + "/"
    points = [m.split()[1] for m in mounts if len(m.split()) > 1 and (m.split()[1] + "/").startswith(prefix)]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=60)
