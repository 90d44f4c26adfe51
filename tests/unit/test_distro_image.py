"""The Debian guest image recipe and its cache key, without debootstrap or QEMU."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from harness import distro_image
from harness.deadline import Deadline
from harness.distro_image import (DebootstrapProgress, copy_overlay, generate_key, image_key,
                                  install_kernel, parse_recipe, recipe_dir, run_streamed)
from harness.errors import HostError, UsageError
from harness.kernels import Kernel

RECIPE = """\
# a comment
suite    bookworm
mirror   http://deb.debian.org/debian
variant  minbase
packages packages     # trailing comment
overlay  files
setup    setup.sh
cmdline  cmdline
label    khroot
size-mb  2048
user     harness
"""


def make_recipe(tmp_path: Path, text: str = RECIPE) -> Path:
    d = tmp_path / "debian"
    (d / "files" / "etc").mkdir(parents=True)
    (d / "recipe").write_text(text)
    (d / "packages").write_text("# base\nsystemd-sysv\nkdump-tools  # the point\n\nopenssh-server\n")
    (d / "setup.sh").write_text("#!/bin/sh\necho setup\n")
    (d / "cmdline").write_text("# options\nroot=LABEL=khroot ro\nconsole=ttyS0\n")
    (d / "files" / "etc" / "hostname").write_text("kh\n")
    return d


def test_the_shipped_recipe_parses_and_has_what_the_issue_needs():
    r = parse_recipe(recipe_dir("debian"))
    assert r.suite == "bookworm"
    for pkg in ("kdump-tools", "openssh-server", "systemd-sysv", "makedumpfile", "kexec-tools", "ethtool"):
        assert pkg in r.packages
    assert any(o.startswith("root=LABEL=") and o.endswith(r.label) for o in r.cmdline)
    assert not any(o.startswith("crashkernel=") for o in r.cmdline)  # the scenario sets it
    assert r.setup.is_file() and os.access(r.setup, os.X_OK)
    assert r.user == "harness"


def test_recipe_values(tmp_path):
    r = parse_recipe(make_recipe(tmp_path))
    assert r.packages == ("systemd-sysv", "kdump-tools", "openssh-server")
    assert r.cmdline == ("root=LABEL=khroot", "ro", "console=ttyS0")
    assert r.size_mb == 2048 and r.label == "khroot" and r.variant == "minbase"
    assert r.overlay == tmp_path / "debian" / "files"


@pytest.mark.parametrize("change, message", [
    ("suite    bookworm\n", "missing setting(s) suite"),
    ("label    khroot\n", "missing setting(s) label"),
])
def test_recipe_missing_settings(tmp_path, change, message):
    d = make_recipe(tmp_path, RECIPE.replace(change, ""))
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_recipe(d)


@pytest.mark.parametrize("line, message", [
    ("colour blue\n", "unknown setting 'colour'"),
    ("suite a b\n", "suite takes 1 value"),
    ("suite sid\n", "suite is set twice"),
    ("size-mb lots\n", "is not a number"),
])
def test_recipe_bad_lines(tmp_path, line, message):
    text = RECIPE + line if "size-mb" not in line else RECIPE.replace("size-mb  2048\n", line)
    with pytest.raises(UsageError, match=message):
        parse_recipe(make_recipe(tmp_path, text))


def test_recipe_names_a_missing_file(tmp_path):
    d = make_recipe(tmp_path)
    (d / "setup.sh").unlink()
    with pytest.raises(UsageError, match="setup.sh.*does not exist"):
        parse_recipe(d)


def test_unknown_guest():
    with pytest.raises(UsageError, match="unknown guest 'fedora'"):
        recipe_dir("fedora")


def test_cache_key_follows_recipe_files_and_kernel(tmp_path):
    d = make_recipe(tmp_path)
    r = parse_recipe(d)
    base = image_key(r, "debian:linux-image-6.1=1")
    assert image_key(parse_recipe(d), "debian:linux-image-6.1=1") == base           # stable
    assert image_key(r, "debian:linux-image-6.1=2") != base                         # the kernel changed
    (d / "files" / "etc" / "hostname").write_text("other\n")
    changed_overlay = image_key(parse_recipe(d), "debian:linux-image-6.1=1")
    assert changed_overlay != base                                                    # an overlay file changed
    (d / "setup.sh").chmod(0o755)
    assert image_key(parse_recipe(d), "debian:linux-image-6.1=1") != changed_overlay  # its mode changed
    (d / "files" / "etc" / "new").write_text("x")
    assert image_key(parse_recipe(d), "debian:linux-image-6.1=1") != changed_overlay  # a file was added


def test_debootstrap_progress_summarises_and_throttles():
    now = [0.0]
    seen = []
    p = DebootstrapProgress(seen.append, every=10, clock=lambda: now[0])
    for line in ("I: Retrieving libc6 2.36", "I: Validating libc6 2.36", "I: Retrieving bash 5.2",
                 "W: something else", "I: Unpacking libc6..."):
        p.line(line)
    assert seen == []                       # not yet: at most every 10 s
    now[0] = 11
    p.line("I: Configuring libc6...")
    assert seen == ["2 retrieved, 1 validated, 1 unpacked, 1 configured packages"]


def test_run_streamed_reports_failure_with_its_last_lines(tmp_path):
    lines = []
    with pytest.raises(HostError, match=r"status 3.*second"):
        run_streamed(["sh", "-c", "echo first; echo second; exit 3"], "a step", Deadline(30, "a step"),
                     on_line=lines.append)
    assert lines == ["first", "second"]


def test_run_streamed_has_a_deadline():
    with pytest.raises(HostError, match="timed out after 1 s waiting for the slow step"):
        run_streamed(["sh", "-c", "echo started; sleep 30"], "slow", Deadline(1, "the slow step", scale=1))


def test_run_streamed_missing_tool():
    with pytest.raises(HostError, match="not found"):
        run_streamed(["/nonexistent/tool"], "x", Deadline(5, "x"))


def test_overlay_and_kernel_go_where_a_package_puts_them(tmp_path):
    tree = tmp_path / "root"
    (tree / "usr" / "lib").mkdir(parents=True)
    (tree / "lib").symlink_to("usr/lib")  # merged /usr, as debootstrap makes it
    src = tmp_path / "files"
    (src / "etc" / "ssh").mkdir(parents=True)
    (src / "etc" / "ssh" / "x.conf").write_text("UseDNS no\n")
    copy_overlay(src, tree)
    assert (tree / "etc" / "ssh" / "x.conf").read_text() == "UseDNS no\n"

    kdir = tmp_path / "k"
    mods = kdir / "lib" / "modules" / "6.1.0-test"
    (mods / "kernel" / "drivers").mkdir(parents=True)
    (mods / "kernel" / "drivers" / "e1000e.ko").write_bytes(b"\x7fELF")
    (mods / "build").symlink_to("/nonexistent/build")
    (kdir / "boot").mkdir()
    (kdir / "boot" / "vmlinuz-6.1.0-test").write_bytes(b"MZ")
    (kdir / "boot" / "config-6.1.0-test").write_text("CONFIG_CRASH_DUMP=y\n")
    k = Kernel(spec="debian-6.1", release="6.1.0-test", image=kdir / "boot" / "vmlinuz-6.1.0-test",
               modules_dir=mods, config_path=kdir / "boot" / "config-6.1.0-test", identity="x")
    install_kernel(k, tree)
    assert (tree / "boot" / "vmlinuz-6.1.0-test").read_bytes() == b"MZ"
    assert (tree / "boot" / "config-6.1.0-test").exists()
    assert (tree / "usr" / "lib" / "modules" / "6.1.0-test" / "kernel" / "drivers" / "e1000e.ko").exists()
    assert not (tree / "usr" / "lib" / "modules" / "6.1.0-test" / "build").exists()


def test_install_kernel_needs_modules(tmp_path):
    k = Kernel(spec="/x", release="r", image=tmp_path / "bz", modules_dir=None, config_path=None, identity="x")
    with pytest.raises(UsageError, match="modules"):
        install_kernel(k, tmp_path)


def test_generated_key_works_with_paramiko():
    paramiko = pytest.importorskip("paramiko")
    private, public = generate_key("kdump-harness@test")
    key = paramiko.Ed25519Key.from_private_key(io.StringIO(private.decode()))
    kind, blob, comment = public.decode().split()
    assert kind == "ssh-ed25519" and blob == key.get_base64() and comment == "kdump-harness@test"
    assert generate_key("x")[0] != private  # a new key each build


def test_a_cached_image_is_used_without_building(tmp_path, monkeypatch):
    d = make_recipe(tmp_path)
    r = parse_recipe(d)
    k = Kernel(spec="debian-6.1", release="6.1.0-test", image=tmp_path / "bz", modules_dir=tmp_path,
               config_path=None, identity="debian:pkg=1")
    final = distro_image.image_dir(r, k)
    final.mkdir(parents=True)
    (final / "manifest.json").write_text('{"cmdline": ["root=LABEL=khroot"], "user": "harness", '
                                         '"kernel_release": "6.1.0-test"}')

    def no_build(*a, **kw):
        raise AssertionError("built although cached")

    monkeypatch.setattr(distro_image, "_build", no_build)
    img = distro_image.build_image(k, recipe=r)
    assert img.dir == final and img.cmdline == ("root=LABEL=khroot",) and img.user == "harness"
    # a changed recipe is another image: this one would have to be built
    (d / "cmdline").write_text("root=LABEL=khroot rw\n")
    assert distro_image.image_dir(parse_recipe(d), k) != final
