"""kdump-harness bisect GOOD BAD --scenario NAME --tree DIR

Drives `git bisect run` over a kernel tree: each step builds the tree with its
own make, runs the scenario on the result, and tells git good (the scenario's
expected verdict), bad (another verdict about the kernel), or skip (the build
failed, the config lacks what kdump needs, or the harness itself failed). So a
regression found at night comes with its commit in the morning.

`python -m harness.bisect step ...` is the per-commit command git runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from .errors import HarnessError, HostError, UsageError

GOOD, BAD, SKIP = 0, 1, 125
DEFAULT_BUILD = "make olddefconfig && make -j{jobs} bzImage modules"
STEP_TIMEOUT_S = 6 * 3600.0  # a whole kernel build on a small machine


def git(tree: Path, *args: str, check: bool = True, timeout: float = 600) -> str:
    try:
        r = subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise HostError("git not found: bisect needs it (apt-get install git)") from None
    except subprocess.TimeoutExpired:
        raise HostError(f"git {' '.join(args)} took more than {timeout:.0f} s") from None
    if check and r.returncode != 0:
        raise UsageError(f"git {' '.join(args)} in {tree}: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    return r.stdout.strip()


def check_tree(tree: Path, good: str, bad: str) -> tuple[str, str]:
    if not tree.is_dir():
        raise UsageError(f"kernel tree {tree} does not exist")
    if git(tree, "rev-parse", "--is-inside-work-tree", check=False) != "true":
        raise UsageError(f"{tree} is not a git work tree")
    if git(tree, "status", "--porcelain", "--untracked-files=no"):
        raise UsageError(f"{tree} has uncommitted changes: commit or stash them; bisect checks out other commits")
    shas = []
    for rev in (good, bad):
        sha = git(tree, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False)
        if not sha:
            raise UsageError(f"{rev!r} is not a commit in {tree}")
        shas.append(sha)
    anc = subprocess.run(["git", "-C", str(tree), "merge-base", "--is-ancestor", shas[0], shas[1]],
                         capture_output=True, timeout=600)
    if anc.returncode != 0:
        raise UsageError(f"GOOD {good} is not an ancestor of BAD {bad}")
    return shas[0], shas[1]


def step(args: argparse.Namespace) -> int:
    """One bisect step: build, run, verdict -> git's exit code."""
    from . import catalog
    from .run import KdumpRun

    tree, out = Path(args.tree), Path(args.out)
    sha = git(tree, "rev-parse", "HEAD")
    subject = git(tree, "log", "-1", "--format=%s")
    record = {"commit": sha, "subject": subject}
    t0 = time.monotonic()
    build = args.build.format(jobs=os.cpu_count() or 1)
    log = out / "steps" / f"{sha[:12]}.build.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        try:
            r = subprocess.run(["sh", "-c", build], cwd=tree, stdout=f, stderr=subprocess.STDOUT,
                               timeout=STEP_TIMEOUT_S)
            built = r.returncode == 0
        except subprocess.TimeoutExpired:
            built = False
    record["build_s"] = round(time.monotonic() - t0, 1)
    if not built:
        record.update(result="skip", why=f"build failed ({log})")
        return _finish(out, record, SKIP)
    scenario = catalog.by_name(args.scenario)
    expected = args.expect or scenario.expect or "PASS"
    try:
        from .kernels import tree_kernel
        k = tree_kernel(tree)
        scenario = scenario.replace(kernel=str(k.image), modules=str(k.modules_dir) if k.modules_dir else None,
                                    kernel_config=str(k.config_path))
        run = KdumpRun(scenario, out / "steps" / sha[:12], accel=args.accel)
        outcome = run.execute()
    except UsageError as e:
        record.update(result="skip", why=str(e))
        return _finish(out, record, SKIP)
    record.update(verdict=outcome.verdict.value, reason=outcome.reason, expected=expected,
                  run_dir=str(out / "steps" / sha[:12]))
    for v in (out / "steps" / sha[:12]).glob("vmcore*"):
        v.unlink()  # a bisect visits many commits: keep reports, not 1 GiB dumps
    if outcome.verdict.value == expected:
        record["result"] = "good"
        return _finish(out, record, GOOD)
    if outcome.verdict.value in ("ERROR", "INCONCLUSIVE"):
        record.update(result="skip", why=f"{outcome.verdict.value}: {outcome.reason}")
        return _finish(out, record, SKIP)
    record["result"] = "bad"
    return _finish(out, record, BAD)


def _finish(out: Path, record: dict, code: int) -> int:
    with open(out / "steps.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"bisect step {record['commit'][:12]} {record['subject'][:60]!r}: {record['result']}"
          f"{' (' + record.get('verdict', record.get('why', '')) + ')'}", file=sys.stderr, flush=True)
    return code


def bisect(tree: Path, good: str, bad: str, scenario: str, out: Path, *, build: str = DEFAULT_BUILD,
           accel: str = "auto", expect: str | None = None) -> dict:
    from . import catalog

    catalog.by_name(scenario)  # bad input fails before git moves anything
    tree = tree.expanduser().resolve()
    good_sha, bad_sha = check_tree(tree, good, bad)
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    git(tree, "bisect", "reset", check=False)
    git(tree, "bisect", "start", bad_sha, good_sha)
    cmd = [sys.executable, "-m", "harness.bisect", "step", "--tree", str(tree), "--out", str(out),
           "--scenario", scenario, "--build", build, "--accel", accel] + (["--expect", expect] if expect else [])
    try:
        r = subprocess.run(["git", "-C", str(tree), "bisect", "run", *cmd], capture_output=True, text=True,
                           timeout=STEP_TIMEOUT_S * 20)
        (out / "bisect-run.log").write_text(r.stdout + r.stderr)
        (out / "bisect.log").write_text(git(tree, "bisect", "log", check=False) + "\n")
    finally:
        git(tree, "bisect", "reset", check=False)
    steps = [json.loads(l) for l in (out / "steps.jsonl").read_text().splitlines()] \
        if (out / "steps.jsonl").exists() else []
    m = re.search(r"^([0-9a-f]{40}) is the first bad commit", r.stdout, re.M)
    result = {"scenario": scenario, "good": good_sha, "bad": bad_sha, "steps": steps,
              "first_bad": m.group(1) if m else None,
              "first_bad_subject": git(tree, "log", "-1", "--format=%s", m.group(1)) if m else None,
              "git_output": r.stdout.strip().splitlines()[-12:]}
    (out / "bisect.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.bisect")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("step")
    s.add_argument("--tree", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--scenario", required=True)
    s.add_argument("--build", default=DEFAULT_BUILD)
    s.add_argument("--accel", default="auto")
    s.add_argument("--expect")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        return step(args)
    except HarnessError as e:
        print(f"bisect step: {e}", file=sys.stderr)
        return SKIP
    except KeyboardInterrupt:
        return 255  # git bisect run stops on exit codes above 127


if __name__ == "__main__":
    sys.exit(main())
