"""Debian kernels of another architecture (apt faked) and arm64 images of one's own."""
from harness import kernels
from harness.cache import cache_root
from harness.kernels import _newest_cached, banner_release, debian_package_for, resolve_kernel, user_kernel


def test_arm64_flavour_asks_apt_for_arm64_packages(monkeypatch):
    asked = []

    def show(pkg):
        asked.append(pkg)
        if pkg.startswith("linux-image-arm64"):
            return {"Depends": "linux-image-6.1.0-56-arm64 (= 6.1.192-2)"}
        return {"Version": "6.1.192-2"}
    monkeypatch.setattr(kernels, "_apt_show", show)
    monkeypatch.setattr("harness.arch.host_arch", lambda: "x86_64")
    assert debian_package_for("debian-6.1", "aarch64") == ("linux-image-6.1.0-56-arm64", "6.1.192-2")
    assert asked == ["linux-image-arm64:arm64", "linux-image-6.1.0-56-arm64:arm64"]
    asked.clear()
    monkeypatch.setattr(kernels, "_apt_show", lambda pkg: asked.append(pkg) or
                        {"Depends": "linux-image-6.1.0-56-amd64 (= 1)", "Version": "1"})
    assert debian_package_for("debian-6.1") == ("linux-image-6.1.0-56-amd64", "1")
    assert asked == ["linux-image-amd64", "linux-image-6.1.0-56-amd64"]


def test_offline_fallback_keeps_architectures_apart():
    base = cache_root() / "kernels"
    for name in ("linux-image-6.1.0-56-amd64_6.1.192-2", "linux-image-6.1.0-56-arm64_6.1.192-2",
                 "linux-image-6.12.117+deb12-arm64_6.12.117-1"):
        (base / name).mkdir(parents=True)
        (base / name / ".complete").write_text("x\n")
    assert _newest_cached("debian-6.1").name == "linux-image-6.1.0-56-amd64_6.1.192-2"
    assert _newest_cached("debian-6.1", "arm64").name == "linux-image-6.1.0-56-arm64_6.1.192-2"
    assert _newest_cached("debian-6.12", "arm64").name.startswith("linux-image-6.12.117+deb12-arm64")
    assert _newest_cached("debian-6.12") is None


def test_fetch_unpacks_the_arm64_package(monkeypatch):
    """The kernel lands in the cache like an x86 one: .complete, modules, config; the
    download names the arm64 build."""
    downloads = []

    def fake_unpack(pkg, version, root):
        downloads.append((pkg, version))
        rel = root / "lib/modules/6.1.0-56-arm64"
        (rel / "kernel").mkdir(parents=True)
        (root / "boot").mkdir()
        (root / "boot/vmlinuz-6.1.0-56-arm64").write_bytes(b"MZ")
        (root / "boot/config-6.1.0-56-arm64").write_text("CONFIG_ARM_SMMU_V3=y\n")
        (root / ".complete").write_text("x\n")
    monkeypatch.setattr(kernels, "_unpack_debian", fake_unpack)
    monkeypatch.setattr(kernels, "debian_package_for", lambda f, a="x86_64": ("linux-image-6.1.0-56-arm64", "6.1.192-2"))
    monkeypatch.setattr("harness.arch.host_arch", lambda: "x86_64")
    k = resolve_kernel("debian-6.1", arch="aarch64")
    assert downloads == [("linux-image-6.1.0-56-arm64:arm64", "6.1.192-2")]
    assert k.arch == "aarch64" and k.release == "6.1.0-56-arm64" and k.config["ARM_SMMU_V3"] == "y"
    assert k.to_json()["arch"] == "aarch64"
    assert resolve_kernel("debian-6.1", arch="aarch64").image == k.image  # cached: nothing downloaded again
    assert len(downloads) == 1


def test_release_of_an_arm64_image(tmp_path):
    img = tmp_path / "Image"
    img.write_bytes(b"MZ" + b"\0" * 4096 + b"Linux version 6.9.0-arm-test (me@host) (gcc) #1 SMP\0" + b"\0" * 100)
    assert banner_release(img) == "6.9.0-arm-test"
    k = user_kernel(img, None)
    assert k.release == "6.9.0-arm-test" and k.arch == "x86_64"
    assert resolve_kernel(str(img), arch="aarch64").arch == "aarch64"
    (tmp_path / "plain").write_bytes(b"\0" * 100)
    assert banner_release(tmp_path / "plain") is None
