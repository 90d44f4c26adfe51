import subprocess
from pathlib import Path

import pytest

from harness import initramfs
from harness.errors import UsageError
from harness.initramfs import Builder, CpioWriter, cpio_bytes, parse_module_list, parse_recipe
from harness.kernels import Kernel


def extract(archive: bytes, dest: Path) -> None:
    dest.mkdir()
    subprocess.run(["cpio", "-id", "--quiet"], input=archive, cwd=dest, check=True)


def test_cpio_is_readable_by_gnu_cpio(tmp_path):
    import io
    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.file("etc/kh/run.env", b"KH_X=1\n")
    w.file("init", b"#!/bin/sh\n", 0o755)
    w.symlink("bin/sh", "busybox")
    w.finish()
    extract(buf.getvalue(), tmp_path / "x")
    assert (tmp_path / "x/etc/kh/run.env").read_bytes() == b"KH_X=1\n"
    assert (tmp_path / "x/init").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "x/bin/sh").is_symlink() and (tmp_path / "x/bin/sh").readlink() == Path("busybox")
    assert len(buf.getvalue()) % 512 == 0


def test_cpio_is_reproducible():
    assert cpio_bytes({"a": b"1", "b/c": b"2"}) == cpio_bytes({"b/c": b"2", "a": b"1"})


def test_recipe_errors_name_the_line(tmp_path):
    r = tmp_path / "x.recipe"
    r.write_text("busybox\nfrobnicate /x\n")
    with pytest.raises(UsageError, match=r"x.recipe:2: unknown directive 'frobnicate'"):
        parse_recipe(r)


def test_module_list(tmp_path):
    f = tmp_path / "m"
    f.write_text("# c\nvirtio_blk\ne1000e ondemand\nvirtio_iommu ondemand optional\n")
    assert parse_module_list(f) == [("virtio_blk", "boot", False), ("e1000e", "ondemand", False),
                                    ("virtio_iommu", "ondemand", True)]
    f.write_text("e1000e sometimes\n")
    with pytest.raises(UsageError, match="expected MODULE"):
        parse_module_list(f)


def fake_kernel(tmp_path: Path) -> Kernel:
    mods = tmp_path / "lib/modules/6.1.0-test"
    (mods / "kernel").mkdir(parents=True)
    for name in ("a", "b", "c"):
        (mods / "kernel" / f"{name}.ko").write_bytes(b"\x7fELF" + name.encode())
    (mods / "modules.dep").write_text("kernel/a.ko: kernel/b.ko kernel/c.ko\nkernel/b.ko: kernel/c.ko\nkernel/c.ko:\n")
    image = tmp_path / "vmlinuz"
    image.write_bytes(b"kernel")
    return Kernel(spec="test", release="6.1.0-test", image=image, modules_dir=mods, config_path=None, identity="test:1")


def test_recipe_build_with_modules_and_cache(tmp_path):
    kernel = fake_kernel(tmp_path)
    rdir = tmp_path / "recipes"
    rdir.mkdir()
    (rdir / "init.sh").write_text("#!/bin/sh\n")
    (rdir / "x.modules").write_text("a boot\n")
    (rdir / "inner.recipe").write_text("script init.sh /init\n")
    (rdir / "outer.recipe").write_text("busybox\nscript init.sh /init\nmodules x.modules\nkernel-image /boot/vmlinuz\n"
                                       "nested inner /boot/inner.cpio\n")
    b = Builder(kernel, rdir)
    path = b.build("outer")
    extract(path.read_bytes(), tmp_path / "root")
    root = tmp_path / "root"
    # dependencies first: c, then b, then a
    assert (root / "etc/kh/mod.a").read_text().split() == ["/lib/modules/c.ko", "/lib/modules/b.ko", "/lib/modules/a.ko"]
    assert (root / "etc/kh/boot-modules").read_text().split() == ["a"]
    assert (root / "boot/vmlinuz").read_bytes() == b"kernel"
    assert (root / "bin/busybox").exists()
    assert (root / "boot/inner.cpio").read_bytes() == b.build("inner").read_bytes()

    # warm: the cached image, nothing rebuilt
    def no_rebuild(*a):
        raise AssertionError("rebuilt a cached image")
    warm = Builder(kernel, rdir)
    warm._write = no_rebuild
    assert warm.build("outer") == path
    # a recipe change is a new image
    (rdir / "init.sh").write_text("#!/bin/sh\necho changed\n")
    assert Builder(kernel, rdir).build("outer") != path


def test_missing_module_is_a_clear_error(tmp_path):
    kernel = fake_kernel(tmp_path)
    rdir = tmp_path / "recipes"
    rdir.mkdir()
    (rdir / "x.modules").write_text("nosuchmod\n")
    (rdir / "r.recipe").write_text("modules x.modules\n")
    with pytest.raises(UsageError, match="module nosuchmod .* neither built into the kernel nor in"):
        Builder(kernel, rdir).build("r")


def test_the_real_recipes_parse():
    for r in initramfs.RECIPE_DIR.glob("*.recipe"):
        assert parse_recipe(r)
    for m in initramfs.RECIPE_DIR.glob("*.modules"):
        assert parse_module_list(m)
