"""A guest userland of another architecture, from Debian packages.

On an x86_64 host an arm64 guest cannot use the host's busybox or kexec. The
harness downloads the arm64 builds of the packages the recipes name
(`apt-get download busybox-static:arm64 ...`, after `dpkg --add-architecture
arm64 && apt-get update`), plus every shared-library package they depend on
(Debian section `libs`, followed transitively), and unpacks them with
`dpkg-deb -x` into one directory of the cache: nothing is installed on the host.

The root is named by the architecture and a hash of the exact package versions,
so a new Debian point release gives a new root and an old one stays valid.
Without the archive (offline) the newest complete root of that architecture is
used.

`GuestRoot` is what `initramfs.Builder` asks for paths and libraries: a guest
path is looked up inside the root (links followed inside it), and the libraries
of a binary come from its ELF dynamic section (harness.elfdeps), since `ldd`
cannot run a foreign binary.
"""

from __future__ import annotations

import hashlib
import logging
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .arch import Arch
from .cache import build_dir, cache_root, locked
from .elfdeps import SharedObject, library_closure, resolve_in_root
from .errors import HostError

log = logging.getLogger(__name__)

ROOT_VERSION = "1"


def _apt(argv: list[str], what: str, cwd: str | None = None, ok_partial: bool = False) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=cwd)
    except FileNotFoundError:
        raise HostError(f"{argv[0]} not found: {what} needs apt (a Debian host)") from None
    except subprocess.TimeoutExpired:
        raise HostError(f"{what}: {argv[0]} took more than 600 s") from None
    if r.returncode != 0 and not (ok_partial and r.stdout.strip()):
        err = (r.stderr or r.stdout).strip().splitlines()
        raise HostError(f"{what} failed: {' '.join(argv)}: {err[-1] if err else r.returncode}")
    return r.stdout


def parse_records(text: str) -> list[dict[str, str]]:
    """`apt-cache show` output -> one dict per record (continuation lines dropped)."""
    out, cur = [], {}
    for line in text.splitlines():
        if not line.strip():
            if cur:
                out.append(cur)
            cur = {}
            continue
        if line[0] in " \t":
            continue
        k, sep, v = line.partition(":")
        if sep:
            cur.setdefault(k, v.strip())
    if cur:
        out.append(cur)
    return out


def dependency_names(record: dict[str, str]) -> list[str]:
    """Package names a record depends on (first of each alternative, no versions or :any)."""
    names = []
    for fieldname in ("Pre-Depends", "Depends"):
        for clause in filter(None, (c.strip() for c in record.get(fieldname, "").split(","))):
            first = clause.split("|")[0].strip()
            name = re.split(r"[\s(]", first, 1)[0].split(":", 1)[0]
            if name:
                names.append(name)
    return names


def is_library_package(record: dict[str, str]) -> bool:
    return record.get("Section", "").split("/")[-1] == "libs"


def resolve_packages(wanted: tuple[str, ...] | list[str], debarch: str) -> dict[str, str]:
    """{package: version} for `wanted` and the library packages they need, transitively,
    as the host's apt lists know them today (for architecture `debarch`)."""
    versions: dict[str, str] = {}
    seen: set[str] = set()
    level = list(dict.fromkeys(wanted))
    top = set(level)
    while level:
        seen.update(level)
        text = _apt(["apt-cache", "show", "--no-all-versions", *(f"{p}:{debarch}" for p in level)],
                    f"looking up {debarch} packages", ok_partial=True)
        records = {r.get("Package"): r for r in parse_records(text) if r.get("Package")}
        nxt: list[str] = []
        for name in level:
            rec = records.get(name)
            if rec is None:
                if name in top:
                    raise HostError(f"apt knows no {name}:{debarch}; run `dpkg --add-architecture {debarch} "
                                    f"&& apt-get update` (ci/setup.sh does)")
                continue  # a virtual package (debconf-2.0): nothing to unpack
            if name not in top and not is_library_package(rec):
                continue
            if rec.get("Architecture") not in (debarch, "all"):
                raise HostError(f"apt gave {name} for {rec.get('Architecture')}, not {debarch}")
            versions[name] = rec["Version"]
            nxt.extend(d for d in dependency_names(rec) if d not in seen and d not in nxt)
        level = nxt
    return dict(sorted(versions.items()))


def root_name(debarch: str, packages: dict[str, str]) -> str:
    h = hashlib.sha256(f"root {ROOT_VERSION}\n".encode())
    for p, v in sorted(packages.items()):
        h.update(f"{p}={v}\n".encode())
    return f"{debarch}-{h.hexdigest()[:16]}"


@dataclass(frozen=True)
class GuestRoot:
    """Debian packages of one architecture, unpacked in the cache."""

    arch: Arch
    path: Path
    packages: dict

    @property
    def boot_modules(self) -> tuple[str, ...]:
        """Modules every image of this architecture loads at boot (the sysrq keyboard)."""
        return self.arch.keyboard_modules

    @property
    def wrappers(self) -> dict[str, str]:
        """{guest path of a binary: script (in the recipe directory) installed in its place}."""
        return dict(self.arch.binary_wrappers)

    @property
    def identity(self) -> str:
        return f"{self.arch.name}:{self.path.name}"

    def search_dirs(self) -> tuple[str, ...]:
        t = self.arch.triplet
        return (f"/lib/{t}", f"/usr/lib/{t}", "/lib", "/usr/lib")

    # -- what initramfs.Builder asks -------------------------------------------------------

    def host_path(self, guest_path: str) -> Path:
        """The file the guest would find at `guest_path`, inside this root. Recipes
        are written on a merged-/usr host (/sbin/x is /usr/sbin/x); the packages
        are unpacked unmerged, so both spellings are tried."""
        for cand in (guest_path, *usrmerge_aliases(guest_path)):
            p = resolve_in_root(self.path, cand)
            if p.is_file():
                return p
        raise HostError(f"{guest_path} is not in the {self.arch.debian} guest root {self.path} "
                        f"(packages: {', '.join(self.packages)}); add the package that ships it "
                        f"to guest_packages in harness/arch.py")

    def libraries(self, binary: Path) -> list[SharedObject]:
        return library_closure(binary, self.path, self.search_dirs(), self.arch.name)

    def key(self) -> str:
        return f"guest-root {self.identity}\n"


def usrmerge_aliases(path: str) -> tuple[str, ...]:
    """/usr/sbin/x <-> /sbin/x, /usr/bin/x <-> /bin/x, /usr/lib/x <-> /lib/x."""
    for top in ("bin", "sbin", "lib"):
        if path.startswith(f"/usr/{top}/"):
            return (path[len("/usr"):],)
        if path.startswith(f"/{top}/"):
            return ("/usr" + path,)
    return ()


def _newest_root(debarch: str) -> Path | None:
    base = cache_root() / "guest-roots"
    if not base.is_dir():
        return None
    roots = [d for d in base.iterdir() if d.name.startswith(debarch + "-") and (d / ".complete").exists()]
    return max(roots, key=lambda d: (d / ".complete").stat().st_mtime) if roots else None


def _read_complete(root: Path) -> dict[str, str]:
    out = {}
    for line in (root / ".complete").read_text().splitlines():
        p, _, v = line.partition("=")
        if p:
            out[p] = v
    return out


def guest_root(arch: Arch, packages: tuple[str, ...] | None = None) -> GuestRoot:
    """The unpacked root for `arch` (its guest_packages, or `packages`), built once."""
    wanted = tuple(packages or arch.guest_packages or ())
    if not wanted:
        raise HostError(f"{arch.name} guests use the host's own userland; there is no guest root to build")
    try:
        versions = resolve_packages(wanted, arch.debian)
    except HostError as e:
        cached = _newest_root(arch.debian)
        if cached is None:
            raise
        log.warning("%s; using the cached guest root %s", e, cached.name)
        return GuestRoot(arch, cached, _read_complete(cached))
    root = cache_root() / "guest-roots" / root_name(arch.debian, versions)
    with locked(root):
        if not (root / ".complete").exists():
            _unpack(arch, versions, root)
    return GuestRoot(arch, root, versions)


def _unpack(arch: Arch, versions: dict[str, str], root: Path) -> None:
    log.info("downloading %d %s packages for the guest userland", len(versions), arch.debian)
    with tempfile.TemporaryDirectory(prefix="kh-debroot-") as dl, build_dir(root) as tmp:
        specs = [f"{p}:{arch.debian}={v}" for p, v in versions.items()]
        _apt(["apt-get", "download", "-o", "APT::Sandbox::User=root", *specs],
             f"downloading {arch.debian} guest packages", cwd=dl)
        debs = sorted(Path(dl).glob("*.deb"))
        if len(debs) != len(versions):
            raise HostError(f"apt-get download gave {len(debs)} files for {len(versions)} packages")
        for deb in debs:
            _apt(["dpkg-deb", "-x", str(deb), str(tmp)], f"unpacking {deb.name}")
        (tmp / ".complete").write_text("".join(f"{p}={v}\n" for p, v in versions.items()))
