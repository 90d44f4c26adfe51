"""The foreign-architecture guest root: which packages, where they go (apt faked)."""
import pytest

from harness import debroot
from harness.arch import arch_info
from harness.debroot import (GuestRoot, dependency_names, parse_records, resolve_packages, root_name,
                             usrmerge_aliases)
from harness.errors import HostError
from tests.elfsynth import make_elf

RECORDS = {
    "kexec-tools": "Package: kexec-tools\nArchitecture: arm64\nVersion: 1:2.0.25-3\nSection: admin\n"
                   "Depends: libc6 (>= 2.34), libxenmisc4.17 (>= 4.17), zlib1g (>= 1:1.2.2.3), "
                   "debconf (>= 0.5) | debconf-2.0, debconf\nDescription: x\n continuation: not a field\n",
    "busybox-static": "Package: busybox-static\nArchitecture: arm64\nVersion: 1:1.35.0-4\nSection: shells\n",
    "libc6": "Package: libc6\nArchitecture: arm64\nVersion: 2.36-9\nSection: libs\nDepends: libgcc-s1\n",
    "libgcc-s1": "Package: libgcc-s1\nArchitecture: arm64\nVersion: 12.2.0-14\nSection: libs\n"
                 "Depends: gcc-12-base (= 12.2.0-14), libc6 (>= 2.35)\n",
    "gcc-12-base": "Package: gcc-12-base\nArchitecture: arm64\nVersion: 12.2.0-14\nSection: libs\n",
    "libxenmisc4.17": "Package: libxenmisc4.17\nArchitecture: arm64\nVersion: 4.17.7\nSection: libs\n"
                      "Depends: libc6 (>= 2.34), libyajl2 (>= 2.0.4)\n",
    "libyajl2": "Package: libyajl2\nArchitecture: arm64\nVersion: 2.1.0-3\nSection: libs\n",
    "zlib1g": "Package: zlib1g\nArchitecture: arm64\nVersion: 1:1.2.13\nSection: libs\nPre-Depends: libc6 (>= 2.14)\n",
    "debconf": "Package: debconf\nArchitecture: all\nVersion: 1.5.82\nSection: admin\nPre-Depends: perl-base\n",
}


@pytest.fixture
def fake_apt(monkeypatch):
    calls = []

    def apt(argv, what, cwd=None, ok_partial=False):
        calls.append(argv)
        names = [a.split(":")[0] for a in argv[3:]]
        return "\n".join(RECORDS[n] for n in names if n in RECORDS)  # debconf-2.0: virtual, unknown

    monkeypatch.setattr(debroot, "_apt", apt)
    return calls


def test_records_and_dependencies():
    recs = parse_records(RECORDS["kexec-tools"] + "\n" + RECORDS["zlib1g"])
    assert [r["Package"] for r in recs] == ["kexec-tools", "zlib1g"]
    assert "continuation" not in recs[0]
    assert dependency_names(recs[0]) == ["libc6", "libxenmisc4.17", "zlib1g", "debconf", "debconf"]
    assert dependency_names(recs[1]) == ["libc6"]  # Pre-Depends count


def test_library_closure_of_the_tools(fake_apt):
    got = resolve_packages(["kexec-tools", "busybox-static"], "arm64")
    # library packages (section libs) followed transitively; debconf (admin) and virtual ones are not
    assert got == {"busybox-static": "1:1.35.0-4", "gcc-12-base": "12.2.0-14", "kexec-tools": "1:2.0.25-3",
                   "libc6": "2.36-9", "libgcc-s1": "12.2.0-14", "libxenmisc4.17": "4.17.7", "libyajl2": "2.1.0-3",
                   "zlib1g": "1:1.2.13"}
    assert all(a.endswith(":arm64") for argv in fake_apt for a in argv[3:])
    assert len(fake_apt) <= 4  # one apt-cache call per level of the dependency tree


def test_unknown_tool_is_named(fake_apt):
    with pytest.raises(HostError, match=r"apt knows no ethtool:arm64; run `dpkg --add-architecture arm64"):
        resolve_packages(["ethtool"], "arm64")


def test_root_name_follows_the_versions():
    a = root_name("arm64", {"libc6": "2.36-9", "busybox-static": "1"})
    assert a == root_name("arm64", {"busybox-static": "1", "libc6": "2.36-9"})
    assert a != root_name("arm64", {"libc6": "2.36-10", "busybox-static": "1"})
    assert a.startswith("arm64-")


def test_usrmerge_aliases():
    assert usrmerge_aliases("/usr/sbin/ethtool") == ("/sbin/ethtool",)
    assert usrmerge_aliases("/sbin/kexec") == ("/usr/sbin/kexec",)
    assert usrmerge_aliases("/etc/x") == ()


def test_guest_root_paths(tmp_path):
    (tmp_path / "sbin").mkdir()
    (tmp_path / "sbin/ethtool").write_bytes(make_elf(183))
    root = GuestRoot(arch_info("aarch64"), tmp_path, {"ethtool": "1"})
    assert root.host_path("/usr/sbin/ethtool") == tmp_path / "sbin/ethtool"  # unmerged package, merged recipe
    with pytest.raises(HostError, match=r"/usr/bin/makedumpfile is not in the arm64 guest root"):
        root.host_path("/usr/bin/makedumpfile")
    assert root.boot_modules == ("virtio_input",)
    assert root.wrappers == {"/sbin/kexec": "kexec-kallsyms.sh"}
    assert "aarch64" in root.key()


def test_guest_root_offline_uses_the_cached_root(monkeypatch, tmp_path):
    def offline(*a, **k):
        raise HostError("apt-cache failed: no network")
    monkeypatch.setattr(debroot, "_apt", offline)
    with pytest.raises(HostError, match="no network"):
        debroot.guest_root(arch_info("aarch64"))
    cached = debroot.cache_root() / "guest-roots" / "arm64-0123456789abcdef"
    cached.mkdir(parents=True)
    (cached / ".complete").write_text("busybox-static=1\n")
    root = debroot.guest_root(arch_info("aarch64"))
    assert root.path == cached and root.packages == {"busybox-static": "1"}


def test_host_arch_has_no_guest_root():
    with pytest.raises(HostError, match="use the host's own userland"):
        debroot.guest_root(arch_info("x86_64"))
