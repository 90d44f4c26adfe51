"""Bad input: one clear line on stderr, exit code 2, never a traceback."""
import subprocess
import sys


from tests.unit.test_kernels import GOOD, fake_bzimage


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def assert_one_clear_line(r, *words):
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_missing_kernel_path(tmp_path):
    r = cli("run", "--kernel", str(tmp_path / "bzImage"), "--out", str(tmp_path / "out"), "--accel", "tcg")
    assert_one_clear_line(r, "does not exist", str(tmp_path / "bzImage"))
    assert not (tmp_path / "out").exists()


def test_config_without_crash_dump(tmp_path):
    img = fake_bzimage(tmp_path / "bzImage")
    cfg = dict(GOOD)
    del cfg["CRASH_DUMP"]
    (tmp_path / "config").write_text("".join(f"CONFIG_{k}={v}\n" for k, v in cfg.items()))
    r = cli("run", "--kernel", str(img), "--config", str(tmp_path / "config"), "--out", str(tmp_path / "out"))
    assert_one_clear_line(r, "CONFIG_CRASH_DUMP")


def test_bad_crash_append_quoting(tmp_path):
    r = cli("run", "--crash-append", '"unterminated', "--out", str(tmp_path / "o"))
    assert_one_clear_line(r, "cannot parse kernel options")


def test_nonempty_outdir_is_refused(tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "report.json").write_text("{}")
    r = cli("run", "--out", str(tmp_path / "o"))
    assert_one_clear_line(r, "not empty")
    assert (tmp_path / "o" / "report.json").read_text() == "{}"  # nothing already produced is lost


def test_bad_timeout_scale(tmp_path, monkeypatch):
    monkeypatch.setenv("KDUMP_HARNESS_TIMEOUT_SCALE", "fast")
    r = cli("run", "--kernel", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert_one_clear_line(r, "KDUMP_HARNESS_TIMEOUT_SCALE")


def test_unknown_arch_is_one_line(tmp_path):
    r = cli("run", "--arch", "sparc", "--out", str(tmp_path / "o"))
    assert_one_clear_line(r, "unknown architecture 'sparc'", "x86_64, aarch64")
    assert not (tmp_path / "o").exists()
