"""Kernels under test: Debian packages (the default), or a user's own build.

`resolve_kernel("debian-6.1")` downloads the current Debian package with
`apt-get download`, unpacks it with `dpkg-deb -x` into the cache (never installs
it on the host) and runs `depmod -b` there. `resolve_kernel("/path/bzImage",
modules="/path/modules")` takes a user's kernel as it is.

`check_config()` refuses, in one line, a kernel whose config lacks what kdump
and the chosen IOMMU need.
"""

from __future__ import annotations

import logging
import lzma
import gzip
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .arch import arch_info
from .cache import build_dir, cache_root, file_digest, locked
from .errors import HostError, UsageError

log = logging.getLogger(__name__)

# Friendly names -> the Debian meta-package whose dependency is the current kernel.
DEBIAN_FLAVOURS = {
    "debian-6.1": "linux-image-amd64",
    "debian-6.12": "linux-image-6.12-amd64",
}
DEFAULT_KERNEL = "debian-6.1"

# Options that must be built in (=y); all others may be modules (=m) too.
BUILTIN_ONLY = {"CRASH_DUMP", "PROC_VMCORE", "KEXEC", "RELOCATABLE", "BLK_DEV_INITRD", "DEVTMPFS",
                "SERIAL_8250_CONSOLE", "INTEL_IOMMU", "AMD_IOMMU", "IRQ_REMAP", "PCI",
                "SERIAL_AMBA_PL011_CONSOLE", "ARM_SMMU_V3"}
WHY = {
    "CRASH_DUMP": "kdump", "PROC_VMCORE": "the crash kernel's /proc/vmcore", "KEXEC": "kexec -p",
    "RELOCATABLE": "a crash kernel loaded at the reserved address", "BLK_DEV_INITRD": "the initramfs",
    "DEVTMPFS": "/dev in the initramfs", "SERIAL_8250_CONSOLE": "the serial console",
    "INTEL_IOMMU": "--iommu intel", "AMD_IOMMU": "--iommu amd", "IRQ_REMAP": "intremap=on",
    "VIRTIO_PCI": "the dump disk", "VIRTIO_BLK": "the dump disk", "VIRTIO_CONSOLE": "the results port",
    "SERIAL_AMBA_PL011_CONSOLE": "the serial console (arm64 virt)", "ARM_SMMU_V3": "--iommu smmuv3",
}


@dataclass(frozen=True)
class Kernel:
    """A kernel image with its modules and (when known) its config."""

    spec: str                     # what the user asked for: "debian-6.1", or a path
    release: str                  # `uname -r`
    image: Path
    modules_dir: Path | None      # .../lib/modules/<release>
    config_path: Path | None
    identity: str                 # cache key: package+version, or content hash
    package: str | None = None    # Debian package name
    version: str | None = None    # Debian package version
    arch: str = "x86_64"          # the architecture it runs on (harness.arch)
    config: dict = field(default_factory=dict, compare=False, repr=False)

    def to_json(self) -> dict:
        return {
            "spec": self.spec, "release": self.release, "image": str(self.image),
            "modules_dir": str(self.modules_dir) if self.modules_dir else None,
            "config": str(self.config_path) if self.config_path else None,
            "package": self.package, "version": self.version, "identity": self.identity,
            "arch": self.arch,
        }


def parse_config(path: Path) -> dict[str, str]:
    opts: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("CONFIG_"):
            k, _, v = line.partition("=")
            opts[k[len("CONFIG_"):]] = v
    return opts


def missing_config(config: dict[str, str], needed: tuple[str, ...] | list[str]) -> list[str]:
    missing = []
    for opt in needed:
        v = config.get(opt)
        if v == "y" or (v == "m" and opt not in BUILTIN_ONLY):
            continue
        missing.append(opt)
    return missing


def check_config(kernel: Kernel, needed: tuple[str, ...] | list[str]) -> None:
    """Raise UsageError naming every missing option, in one line."""
    if kernel.config_path is None:
        log.warning("no kernel config found for %s: cannot check it has what kdump needs (give --config)", kernel.image)
        return
    missing = missing_config(kernel.config, needed)
    if missing:
        what = ", ".join(f"CONFIG_{m}{'=y' if m in BUILTIN_ONLY else ''} ({WHY.get(m, 'required')})" for m in missing)
        raise UsageError(f"kernel config {kernel.config_path} lacks {what}; rebuild the kernel with "
                         f"{'it' if len(missing) == 1 else 'them'} or choose another kernel")


# -- Debian packages -------------------------------------------------------------

def _run(argv: list[str], what: str, **kw) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=600, **kw)
    except FileNotFoundError:
        raise HostError(f"{argv[0]} not found: {what} needs it (run ci/setup.sh)") from None
    except subprocess.TimeoutExpired:
        raise HostError(f"{what}: {argv[0]} took more than 600 s") from None
    if r.returncode != 0:
        err = (r.stderr or r.stdout).strip().splitlines()
        raise HostError(f"{what} failed: {' '.join(argv)}: {err[-1] if err else r.returncode}")
    return r.stdout


def _apt_show(pkg: str) -> dict[str, str]:
    out = _run(["apt-cache", "show", "--no-all-versions", pkg], f"looking up {pkg}")
    fields = {}
    for line in out.splitlines():
        k, sep, v = line.partition(": ")
        if sep and not line.startswith(" "):
            fields.setdefault(k, v)
    return fields


def debian_package_for(flavour: str, arch: str = "x86_64") -> tuple[str, str]:
    """(package, version) of the kernel a friendly name stands for, today."""
    a = arch_info(arch)
    meta = a.debian_package(a.kernel_meta[flavour])
    depends = _apt_show(meta).get("Depends", "")
    m = re.search(r"(linux-image-[0-9][^ ,|]*)", depends)
    if not m:
        raise HostError(f"cannot tell which kernel {meta} points to (Depends: {depends!r}); run apt-get update")
    pkg = m.group(1)
    return pkg, _apt_show(a.debian_package(pkg))["Version"]


def _find_release_dir(root: Path) -> Path:
    for base in (root / "lib/modules", root / "usr/lib/modules"):
        if base.is_dir():
            dirs = [d for d in base.iterdir() if d.is_dir()]
            if len(dirs) == 1:
                return dirs[0]
    raise HostError(f"no lib/modules/<release> in {root}")


def fetch_debian_kernel(flavour_or_pkg: str, arch: str = "x86_64") -> Kernel:
    """A friendly name (debian-6.1), or debian:<package> (current version) or
    debian:<package>=<version> (exactly that build, from the cache or the archive).
    `arch` other than the host's: that architecture's package (pkg:arm64)."""
    spec = flavour_or_pkg
    a = arch_info(arch)
    pinned = None
    if flavour_or_pkg.startswith("debian:") and "=" in flavour_or_pkg:
        pkg, pinned = flavour_or_pkg.split(":", 1)[1].split("=", 1)
    try:
        if pinned is not None:
            version = pinned
        elif flavour_or_pkg in a.kernel_meta:
            pkg, version = debian_package_for(flavour_or_pkg, a.name)
        else:
            pkg = flavour_or_pkg.split(":", 1)[1]
            version = _apt_show(a.debian_package(pkg))["Version"]
    except HostError as e:
        cached = _newest_cached(flavour_or_pkg, a.debian)
        if cached is None:
            raise
        log.warning("%s; using the cached %s", e, cached.name)
        pkg, version = cached.name.rsplit("_", 1)
    root = cache_root() / "kernels" / f"{pkg}_{version}"
    with locked(root):
        if not (root / ".complete").exists():
            _unpack_debian(a.debian_package(pkg), version, root)
    rel_dir = _find_release_dir(root)
    release = rel_dir.name
    image = root / "boot" / f"vmlinuz-{release}"
    config = root / "boot" / f"config-{release}"
    return Kernel(spec=spec, release=release, image=image, modules_dir=rel_dir,
                  config_path=config if config.exists() else None, identity=f"debian:{pkg}={version}",
                  package=pkg, version=version, config=parse_config(config) if config.exists() else {},
                  arch=a.name)


def _newest_cached(flavour_or_pkg: str, debarch: str = "amd64") -> Path | None:
    base = cache_root() / "kernels"
    if not base.is_dir():
        return None
    prefix = {"debian-6.1": "linux-image-6.1.", "debian-6.12": "linux-image-6.12."}.get(flavour_or_pkg, "")
    if not prefix:
        prefix = flavour_or_pkg.split(":", 1)[-1] + "_"
    # Debian kernel packages end in -<arch> (or -<arch>-unsigned): keep other architectures' out
    found = sorted(d for d in base.iterdir() if d.name.startswith(prefix) and (d / ".complete").exists()
                   and re.search(rf"-{debarch}(?:-unsigned)?_", d.name))
    return found[-1] if found else None


def _unpack_debian(pkg: str, version: str, root: Path) -> None:
    log.info("downloading %s %s", pkg, version)
    with tempfile.TemporaryDirectory(prefix="kh-deb-") as dl, build_dir(root) as tmp:
        _run(["apt-get", "download", "-o", "APT::Sandbox::User=root", f"{pkg}={version}"], f"downloading {pkg}", cwd=dl)
        debs = list(Path(dl).glob("*.deb"))
        if len(debs) != 1:
            raise HostError(f"apt-get download {pkg} gave {len(debs)} files")
        _run(["dpkg-deb", "-x", str(debs[0]), str(tmp)], f"unpacking {debs[0].name}")
        rel_dir = _find_release_dir(tmp)
        # depmod -b BASE wants BASE/lib/modules/<release>; the package has no modules.dep
        _run(["depmod", "-b", str(rel_dir.parents[2]), rel_dir.name], "depmod")
        (tmp / ".complete").write_text(f"{pkg} {version}\n")


# -- a user's own kernel -----------------------------------------------------------

def bzimage_release(image: Path) -> str | None:
    """The release string an x86 bzImage carries in its setup header (kernel_version)."""
    try:
        with open(image, "rb") as f:
            head = f.read(0x10000)
    except OSError:
        return None
    if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
        return None
    off = int.from_bytes(head[0x20E:0x210], "little")
    if not off:
        return None
    s = head[off + 0x200: off + 0x200 + 256].split(b"\0", 1)[0].decode("ascii", "replace")
    return s.split()[0] if s else None


def banner_release(image: Path) -> str | None:
    """The release in an uncompressed kernel image's "Linux version X" banner (an
    arm64 Image has no setup header to read it from)."""
    try:
        with open(image, "rb") as f:
            data = f.read(64 << 20)
    except OSError:
        return None
    m = re.search(rb"Linux version (\S+) \(", data)
    return m.group(1).decode("ascii", "replace") if m else None


def _user_modules_dir(modules: Path, release: str | None) -> Path:
    for cand in ([modules / "lib/modules" / release, modules / release] if release else []) + [modules]:
        if (cand / "kernel").is_dir() or (cand / "modules.order").exists() or (cand / "modules.dep").exists():
            return cand
    if (modules / "lib/modules").is_dir():
        subs = [d for d in (modules / "lib/modules").iterdir() if d.is_dir()]
        if len(subs) == 1:
            return subs[0]
    raise UsageError(f"{modules} holds no kernel modules (expected lib/modules/<release>/ or a "
                     f"directory with kernel/ and modules.order); give the INSTALL_MOD_PATH of `make modules_install`")


def _user_config(image: Path, modules_dir: Path | None, release: str | None) -> Path | None:
    cands = []
    if release:
        cands.append(image.parent / f"config-{release}")
    cands.append(image.parent / ".config")
    if image.parent.name == "boot" and image.parent.parent.name in ("x86", "arm64"):  # arch/*/boot/{bzImage,Image}
        cands.append(image.parents[3] / ".config")
    if modules_dir is not None:
        cands += [modules_dir / "build" / ".config", modules_dir / "config"]
    for c in cands:
        if c.is_file():
            return c
    return None


def user_kernel(image: str | Path, modules: str | Path | None, config: str | Path | None = None) -> Kernel:
    image = Path(image).expanduser()
    if not image.is_file():
        raise UsageError(f"kernel image {image} does not exist; give the path of a bzImage "
                         f"(arch/x86/boot/bzImage) or a Debian kernel name ({', '.join(DEBIAN_FLAVOURS)})")
    release = bzimage_release(image) or banner_release(image)
    modules_dir = None
    if modules is not None:
        mpath = Path(modules).expanduser()
        if not mpath.is_dir():
            raise UsageError(f"modules directory {mpath} does not exist; give the INSTALL_MOD_PATH of `make modules_install`")
        modules_dir = _user_modules_dir(mpath, release)
        release = release or modules_dir.name
    if config is not None:
        cpath: Path | None = Path(config).expanduser()
        if not cpath.is_file():
            raise UsageError(f"kernel config {cpath} does not exist")
    else:
        cpath = _user_config(image, modules_dir, release)
    ident = "user:" + file_digest(image)[:16]
    if modules_dir is not None:
        st = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(modules_dir.rglob("*.ko*"))]
        ident += ":" + str(abs(hash(tuple(st))) % (1 << 60))
    return Kernel(spec=str(image), release=release or "unknown", image=image, modules_dir=modules_dir,
                  config_path=cpath, identity=ident, config=parse_config(cpath) if cpath else {})


def tree_kernel(tree: str | Path) -> Kernel:
    """A built kernel tree: arch/x86/boot/bzImage, its .config, and its modules
    installed with the tree's own `make modules_install` into the cache (keyed by
    the image and the modules' build state, so a rebuilt tree installs again)."""
    tree = Path(tree).expanduser().resolve()
    image = tree / "arch/x86/boot/bzImage"
    config = tree / ".config"
    if not tree.is_dir():
        raise UsageError(f"kernel tree {tree} does not exist")
    if not image.is_file():
        raise UsageError(f"{tree} has no arch/x86/boot/bzImage: build it first (make bzImage modules)")
    if not config.is_file():
        raise UsageError(f"{tree} has no .config: it is not a configured kernel tree")
    cfg = parse_config(config)
    modules = None
    if cfg.get("MODULES") == "y":
        order = tree / "modules.order"
        if not order.is_file():
            raise UsageError(f"{tree} has CONFIG_MODULES=y but no modules.order: build the modules (make modules)")
        key = file_digest(image)[:12] + "-" + str(order.stat().st_mtime_ns)
        dest = cache_root() / "tree-modules" / key
        with locked(dest):
            if not (dest / ".complete").exists():
                with build_dir(dest) as tmp:
                    _run(["make", "-C", str(tree), "-s", "modules_install", f"INSTALL_MOD_PATH={tmp}",
                          "INSTALL_MOD_STRIP=1"], f"make modules_install in {tree}")
                    (tmp / ".complete").write_text(str(tree) + "\n")
        modules = dest
    return user_kernel(image, modules, config)


def resolve_kernel(spec: str | None = None, modules: str | None = None, config: str | None = None,
                   arch: str = "x86_64") -> Kernel:
    spec = spec or DEFAULT_KERNEL
    if spec in DEBIAN_FLAVOURS or spec.startswith("debian:"):
        if modules:
            raise UsageError("--modules goes with --kernel PATH, not with a Debian kernel (its modules come with it)")
        k = fetch_debian_kernel(spec, arch)
        if config:
            cpath = Path(config)
            return Kernel(**{**k.__dict__, "config_path": cpath, "config": parse_config(cpath)})
        return k
    if spec.startswith("debian"):
        raise UsageError(f"unknown Debian kernel {spec!r}; choose one of {', '.join(DEBIAN_FLAVOURS)} or debian:<package>")
    k = user_kernel(spec, modules, config)
    return k if arch_info(arch).name == "x86_64" else Kernel(**{**k.__dict__, "arch": arch_info(arch).name})


# -- modules -------------------------------------------------------------------------

def _modname(path: str) -> str:
    base = os.path.basename(path)
    for ext in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(ext):
            base = base[: -len(ext)]
            break
    return base.replace("-", "_")


class ModuleIndex:
    """Module name -> file and dependencies, from modules.dep when present,
    else from `modinfo -F depends` walking only what is asked for."""

    def __init__(self, modules_dir: Path):
        self.dir = modules_dir
        self.builtin: set[str] = set()
        b = modules_dir / "modules.builtin"
        if b.exists():
            self.builtin = {_modname(l) for l in b.read_text().split()}
        self.paths: dict[str, Path] = {}
        self.deps: dict[str, list[str]] = {}
        dep = modules_dir / "modules.dep"
        if dep.exists():
            for line in dep.read_text().splitlines():
                mod, _, rest = line.partition(":")
                name = _modname(mod)
                self.paths[name] = modules_dir / mod
                self.deps[name] = [_modname(d) for d in rest.split()]
        else:
            for p in modules_dir.rglob("*.ko*"):
                self.paths.setdefault(_modname(p.name), p)

    def _deps_of(self, name: str) -> list[str]:
        if name not in self.deps:
            out = _run(["modinfo", "-F", "depends", str(self.paths[name])], f"modinfo {name}")
            self.deps[name] = [_modname(d) for d in out.strip().split(",") if d]
        return self.deps[name]

    def resolve(self, wanted: list[str], optional: set[str] = frozenset()) -> list[Path]:
        """Files to insmod, dependencies first; built-in modules are skipped."""
        order: list[Path] = []
        done: set[str] = set()

        def visit(name: str, chain: tuple[str, ...]) -> None:
            name = name.replace("-", "_")
            if name in done or name in self.builtin:
                return
            if name not in self.paths:
                if name in optional:
                    return
                raise UsageError(f"module {name} (wanted by {' <- '.join(chain) or 'the recipe'}) is neither built "
                                 f"into the kernel nor in {self.dir}; build it (=m or =y) or drop it from the recipe")
            done.add(name)
            for d in self._deps_of(name):
                visit(d, chain + (name,))
            order.append(self.paths[name])

        for w in wanted:
            visit(w, ())
        return order


def module_bytes(path: Path) -> bytes:
    """A module's ELF bytes, decompressed (busybox insmod cannot read .ko.xz)."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        try:
            return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError) as e:
            raise HostError(f"cannot decompress {path} (install zstd): {e}") from None
    return data
