import pytest

from harness.errors import UsageError
from harness.kernels import (Kernel, ModuleIndex, bzimage_release, check_config, missing_config, parse_config,
                             resolve_kernel, user_kernel)
from harness.platforms import KDUMP_CONFIG_NEEDED, iommu_model

GOOD = {o: "y" for o in KDUMP_CONFIG_NEEDED + ("INTEL_IOMMU", "AMD_IOMMU", "IRQ_REMAP")}


def fake_bzimage(path, release="6.9.0-test"):
    head = bytearray(0x1000)
    head[0x202:0x206] = b"HdrS"
    head[0x20E:0x210] = (0x800 - 0x200).to_bytes(2, "little")
    s = f"{release} (me@host) #1 SMP".encode()
    head[0x800:0x800 + len(s)] = s
    path.write_bytes(bytes(head))
    return path


def test_bzimage_release(tmp_path):
    assert bzimage_release(fake_bzimage(tmp_path / "bzImage")) == "6.9.0-test"
    (tmp_path / "junk").write_bytes(b"not a kernel")
    assert bzimage_release(tmp_path / "junk") is None


def test_parse_and_missing_config(tmp_path):
    c = tmp_path / "config"
    c.write_text("CONFIG_CRASH_DUMP=y\n# CONFIG_KEXEC is not set\nCONFIG_VIRTIO_BLK=m\nCONFIG_INTEL_IOMMU=m\n")
    cfg = parse_config(c)
    assert cfg == {"CRASH_DUMP": "y", "VIRTIO_BLK": "m", "INTEL_IOMMU": "m"}
    # =m is fine for a driver, not for what must be built in
    assert missing_config(cfg, ["CRASH_DUMP", "KEXEC", "VIRTIO_BLK", "INTEL_IOMMU"]) == ["KEXEC", "INTEL_IOMMU"]


def test_check_config_names_every_missing_option_in_one_line(tmp_path):
    c = tmp_path / "config"
    cfg = dict(GOOD)
    del cfg["CRASH_DUMP"], cfg["INTEL_IOMMU"]
    c.write_text("".join(f"CONFIG_{k}={v}\n" for k, v in cfg.items()))
    k = Kernel(spec="x", release="r", image=c, modules_dir=None, config_path=c, identity="x", config=parse_config(c))
    with pytest.raises(UsageError) as e:
        check_config(k, KDUMP_CONFIG_NEEDED + iommu_model("intel").config_needed)
    msg = str(e.value)
    assert "\n" not in msg
    assert "CONFIG_CRASH_DUMP=y" in msg and "CONFIG_INTEL_IOMMU=y" in msg
    check_config(k, KDUMP_CONFIG_NEEDED[1:])  # without the missing ones: fine


def test_user_kernel_missing_path_is_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        resolve_kernel(str(tmp_path / "nope" / "bzImage"))


def test_user_kernel_finds_modules_and_config(tmp_path):
    img = fake_bzimage(tmp_path / "bzImage", "6.9.0-test")
    mods = tmp_path / "mods" / "lib/modules/6.9.0-test"
    (mods / "kernel").mkdir(parents=True)
    (mods / "modules.dep").write_text("")
    (tmp_path / ".config").write_text("CONFIG_CRASH_DUMP=y\n")
    k = user_kernel(img, tmp_path / "mods")
    assert k.release == "6.9.0-test"
    assert k.modules_dir == mods
    assert k.config_path == tmp_path / ".config"
    with pytest.raises(UsageError, match="holds no kernel modules"):
        user_kernel(img, tmp_path)  # a directory without modules


def test_unknown_debian_kernel():
    with pytest.raises(UsageError, match="unknown Debian kernel"):
        resolve_kernel("debian-2.4")


def test_module_index_without_modules_dep_uses_modinfo(tmp_path, monkeypatch):
    (tmp_path / "kernel").mkdir()
    for n in ("x", "y"):
        (tmp_path / "kernel" / f"{n}.ko.xz").write_bytes(b"")
    (tmp_path / "modules.builtin").write_text("kernel/z.ko\n")
    calls = []

    def fake_run(argv, what, **kw):
        calls.append(argv[-1])
        return "y\n" if argv[-1].endswith("x.ko.xz") else "\n"
    monkeypatch.setattr("harness.kernels._run", fake_run)
    idx = ModuleIndex(tmp_path)
    assert [p.name for p in idx.resolve(["x", "z"])] == ["y.ko.xz", "x.ko.xz"]
