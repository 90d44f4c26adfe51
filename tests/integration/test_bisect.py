"""kdump-harness bisect over a git tree whose commits "build" prebuilt kernels.

Two real Debian kernels stand in for commits: the first two commits build
Debian's 6.12 kernel, the last two its 6.1 kernel. The scenario's crash kernel
must live in a 96M reservation, which 6.12's does and 6.1's does not (it runs out
of memory unpacking its initramfs): a crash-kernel footprint regression, which
bisect must pin on the third commit.
"""
import json
import subprocess
import sys

import pytest

from harness.kernels import resolve_kernel

pytestmark = pytest.mark.boot

MAKEFILE = """\
# Stands in for a kernel tree: "building" copies the prebuilt kernel named in KERNEL.
KROOT := $(shell cat KERNEL)
olddefconfig:
\t@true
bzImage:
\tmkdir -p arch/x86/boot
\tcp -f $(wildcard $(KROOT)/boot/vmlinuz-*) arch/x86/boot/bzImage
\tcp -f $(wildcard $(KROOT)/boot/config-*) .config
modules: bzImage
\ttouch modules.order
modules_install:
\tmkdir -p $(INSTALL_MOD_PATH)/lib
\tcp -al $(KROOT)/lib/modules $(INSTALL_MOD_PATH)/lib/
"""


def git(tree, *args):
    subprocess.run(["git", "-C", str(tree), *args], check=True, capture_output=True)


def test_bisect_finds_the_commit_that_broke_kdump(tmp_path, request):
    good, bad = resolve_kernel("debian-6.12"), resolve_kernel("debian-6.1")
    tree = tmp_path / "linux"
    tree.mkdir()
    git(tree, "init", "-q", "-b", "main")
    git(tree, "config", "user.email", "ci@example.invalid")
    git(tree, "config", "user.name", "ci")
    (tree / "Makefile").write_text(MAKEFILE)
    (tree / ".gitignore").write_text("arch/\n.config\nmodules.order\n")
    subjects = ["base: 6.12", "tweak docs", "mm: grow the crash kernel (6.1 stands in)", "later fix elsewhere"]
    for i, subject in enumerate(subjects):
        root = good if i < 2 else bad
        (tree / "KERNEL").write_text(str(root.image.parent.parent) + "\n")
        (tree / "NOTES").write_text(f"commit {i}\n")
        git(tree, "add", "-A")
        git(tree, "commit", "-q", "-m", subject)
    shas = subprocess.run(["git", "-C", str(tree), "rev-list", "--reverse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.split()
    out = tmp_path / "bisect"
    r = subprocess.run([sys.executable, "-m", "harness.cli", "bisect", shas[0], shas[-1],
                        "--scenario", "intel-crashkernel-96M-6.12", "--tree", str(tree), "--out", str(out),
                        "--accel", request.config.getoption("--kh-accel")],
                       capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"first bad commit: {shas[2][:12]} mm: grow the crash kernel" in r.stdout
    res = json.loads((out / "bisect.json").read_text())
    assert res["first_bad"] == shas[2]
    bad_steps = [s for s in res["steps"] if s["result"] == "bad"]
    assert bad_steps and all(s["verdict"] == "KDUMP_PANIC" for s in bad_steps)
    assert any(s["result"] == "good" and s["verdict"] == "PASS" for s in res["steps"])
    # the tree is back where it was
    head = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert head == shas[-1]
    assert not (tree / ".git" / "BISECT_LOG").exists()
