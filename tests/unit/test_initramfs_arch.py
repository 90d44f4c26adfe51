"""The recipes build images for another architecture; x86 images stay what they were."""
import hashlib
import subprocess
from pathlib import Path

import pytest

from harness.arch import arch_info
from harness.debroot import GuestRoot
from harness.elfdeps import read_elf
from harness.initramfs import RECIPE_DIR, Builder
from harness.kernels import Kernel
from tests.elfsynth import make_elf

# sha256 of the image below as built by the builder before architectures existed
# (commit e84ddb2): the host-userland path must keep producing exactly these bytes.
X86_GOLDEN = "1bb19fa189e86f3da4e08d14296926f37432759e5b4654ab328689fc017bfc8d"


def extract(archive: bytes, dest: Path) -> Path:
    dest.mkdir()
    subprocess.run(["cpio", "-id", "--quiet"], input=archive, cwd=dest, check=True)
    return dest


def fake_kernel(tmp: Path, arch: str = "x86_64", extra_mods: tuple[str, ...] = ()) -> Kernel:
    mods = tmp / "lib/modules/6.1.0-test"
    (mods / "kernel").mkdir(parents=True)
    for name in ("a", "b", "c", *extra_mods):
        (mods / "kernel" / f"{name}.ko").write_bytes(b"\x7fELF" + name.encode() * 100)
    dep = "kernel/a.ko: kernel/b.ko kernel/c.ko\nkernel/b.ko: kernel/c.ko\nkernel/c.ko:\n"
    dep += "".join(f"kernel/{m}.ko:\n" for m in extra_mods)
    (mods / "modules.dep").write_text(dep)
    image = tmp / "vmlinuz"
    image.write_bytes(b"kernel-image" * 1000)
    return Kernel(spec="test", release="6.1.0-test", image=image, modules_dir=mods, config_path=None,
                  identity="test:1", arch=arch)


def synth_recipes(tmp: Path) -> tuple[Path, dict]:
    r = tmp / "recipes"
    r.mkdir()
    (r / "init.sh").write_text("#!/bin/sh\necho hi\n")
    (r / "x.modules").write_text("a boot\nc ondemand\n")
    (r / "data").write_bytes(b"data file\n")
    helper = tmp / "helper"
    helper.write_bytes(b"\x7fELF-static-helper")
    (r / "inner.recipe").write_text("script init.sh /init\nmodules x.modules\n")
    (r / "outer.recipe").write_text(f"script init.sh /init\nfile {r / 'data'} /etc/data\nmodules x.modules\n"
                                    "kernel-image /boot/vmlinuz\nnested inner /boot/inner.cpio\nhelper khdma /sbin/khdma\n")
    return r, {"khdma": helper}


def test_x86_image_is_byte_identical_to_before(tmp_path):
    kernel = fake_kernel(tmp_path)
    recipes, helpers = synth_recipes(tmp_path)
    data = Builder(kernel, recipes, helpers=helpers).build("outer").read_bytes()
    assert hashlib.sha256(data).hexdigest() == X86_GOLDEN


def arm64_root(tmp: Path) -> GuestRoot:
    """A tiny unpacked 'arm64 Debian' with synthetic aarch64 ELF files, laid out as
    the packages lay them out (unmerged /usr, loader behind a link)."""
    root = tmp / "root"
    lib = root / "lib/aarch64-linux-gnu"
    lib.mkdir(parents=True)
    (root / "bin").mkdir()
    (root / "sbin").mkdir()
    (lib / "ld-linux-aarch64.so.1").write_bytes(make_elf(183, soname="ld-linux-aarch64.so.1"))
    (root / "lib/ld-linux-aarch64.so.1").symlink_to("aarch64-linux-gnu/ld-linux-aarch64.so.1")
    (lib / "libc.so.6").write_bytes(make_elf(183, soname="libc.so.6", needed=("ld-linux-aarch64.so.1",)))
    (lib / "libmnl.so.0.2.0").write_bytes(make_elf(183, soname="libmnl.so.0", needed=("libc.so.6",)))
    (lib / "libmnl.so.0").symlink_to("libmnl.so.0.2.0")
    (root / "bin/busybox").write_bytes(make_elf(183))
    interp = "/lib/ld-linux-aarch64.so.1"
    (root / "sbin/kexec").write_bytes(make_elf(183, interp=interp, needed=("libc.so.6",)))
    (root / "sbin/ethtool").write_bytes(make_elf(183, interp=interp, needed=("libmnl.so.0", "libc.so.6")))
    return GuestRoot(arch_info("aarch64"), root, {"busybox-static": "1", "kexec-tools": "1", "ethtool": "1"})


def test_arm64_image_from_a_guest_root(tmp_path):
    kernel = fake_kernel(tmp_path, "aarch64", extra_mods=("virtio_input",))
    recipes, helpers = synth_recipes(tmp_path)
    (recipes / "kexec-kallsyms.sh").write_bytes((RECIPE_DIR / "kexec-kallsyms.sh").read_bytes())
    (recipes / "tools.recipe").write_text("busybox\nbinary /sbin/kexec\nbinary /usr/sbin/ethtool\n"
                                          "modules x.modules\nnested outer /boot/outer.cpio\n")
    root = arm64_root(tmp_path)
    b = Builder(kernel, recipes, helpers=helpers, userland=root)
    out = b.build("tools")
    x = extract(out.read_bytes(), tmp_path / "x")
    assert read_elf(x / "bin/busybox").machine == "aarch64"
    # kexec is the kallsyms wrapper; the real binary sits beside it
    assert (x / "sbin/kexec").read_bytes() == (RECIPE_DIR / "kexec-kallsyms.sh").read_bytes()
    assert read_elf(x / "sbin/kexec.bin").interp == "/lib/ld-linux-aarch64.so.1"
    assert read_elf(x / "usr/sbin/ethtool").needed == ("libmnl.so.0", "libc.so.6")  # found at /sbin in the root
    # the loader at its PT_INTERP path (a file, not a link out of the image), libraries by soname
    assert not (x / "lib/ld-linux-aarch64.so.1").is_symlink()
    assert read_elf(x / "lib/ld-linux-aarch64.so.1").soname == "ld-linux-aarch64.so.1"
    assert read_elf(x / "lib/aarch64-linux-gnu/libmnl.so.0").soname == "libmnl.so.0"
    assert (x / "lib/aarch64-linux-gnu/libc.so.6").exists()
    assert not (x / "lib/aarch64-linux-gnu/ld-linux-aarch64.so.1").exists()  # no second copy
    # the sysrq keyboard's driver first, then the recipe's modules
    assert (x / "etc/kh/boot-modules").read_text().split() == ["virtio_input", "a"]
    assert (x / "etc/kh/mod.virtio_input").read_text().split() == ["/lib/modules/virtio_input.ko"]
    # the cache key carries the architecture and the root: an x86 build of the recipe is another file
    x86 = Builder(fake_kernel(tmp_path / "k86"), recipes, helpers=helpers)
    assert b.key("outer") != x86.key("outer")
    other_root = GuestRoot(root.arch, root.path, {**root.packages, "ethtool": "2"})
    assert Builder(kernel, recipes, helpers=helpers, userland=GuestRoot(root.arch, tmp_path / "elsewhere",
                                                                        other_root.packages)).key("outer") != b.key("outer")


def test_arm64_image_names_a_missing_library(tmp_path):
    kernel = fake_kernel(tmp_path, "aarch64", extra_mods=("virtio_input",))
    recipes, helpers = synth_recipes(tmp_path)
    (recipes / "kexec-kallsyms.sh").write_text("#!/bin/sh\n")
    (recipes / "t.recipe").write_text("binary /usr/sbin/ethtool\n")
    root = arm64_root(tmp_path)
    (root.path / "lib/aarch64-linux-gnu/libmnl.so.0.2.0").unlink()
    with pytest.raises(Exception, match=r"libmnl.so.0 \(needed by ethtool\)"):
        Builder(kernel, recipes, helpers=helpers, userland=root).build("t")
