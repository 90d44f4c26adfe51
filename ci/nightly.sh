#!/bin/sh
# The shell part of the nightly CI templates (ci/github-actions.yml, ci/gitlab-ci.yml):
# everything a runner does, so it can be run and checked on any Debian 12 machine.
#
#   ci/nightly.sh run OUT [FILTER ...]     set up, run the scenario matrix, collect artifacts
#   ci/nightly.sh collect OUT              (after a run) OUT/artifacts: reports of every run, and the
#                                          vmcores of runs that did not give their expected verdict, compressed
#
# The kernel under test (default: each scenario's own Debian kernel):
#   KH_KERNEL_TREE=DIR                     a built tree (arch/x86/boot/bzImage, .config, modules)
#   KH_KERNEL=bzImage KH_MODULES=DIR [KH_CONFIG=.config]
# KH_JOBS: scenarios at a time (default: the number of CPUs). FILTER: catalog tags or name
# globs (kdump-harness list); the default is every entry but the slow ones.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
cmd=${1:?usage: ci/nightly.sh run OUT [FILTER ...] | collect OUT}
out=${2:?usage: ci/nightly.sh run OUT [FILTER ...] | collect OUT}
shift 2

collect() {
    art="$out/artifacts"
    mkdir -p "$art"
    for f in junit.xml matrix.html matrix.json; do
        [ -f "$out/$f" ] && cp "$out/$f" "$art/"
    done
    # small files of every run; vmcores only of the unexpected ones, compressed
    "$here/.venv/bin/python" - "$out" "$art" <<'PY'
import json, shutil, subprocess, sys
from pathlib import Path
out, art = Path(sys.argv[1]), Path(sys.argv[2])
doc = json.loads((out / "matrix.json").read_text())
for run in doc["runs"]:
    src, dst = Path(run["run_dir"]), art / run["scenario"]
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.glob("*"):
        if f.is_file() and f.suffix in (".json", ".html", ".log", ".txt", ".sh"):
            shutil.copy(f, dst / f.name)
    if not run["matched"]:
        for core in src.glob("vmcore*"):
            subprocess.run(["zstd", "-q", "-T0", "-3", str(core), "-o", str(dst / (core.name + ".zst"))],
                           check=True)
            print(f"kept {dst / (core.name + '.zst')} ({run['scenario']}: {run['verdict']}, "
                  f"expected {run['expected']})", file=sys.stderr)
PY
}

case "$cmd" in
run)
    "$here/ci/setup.sh"
    set -- "$@" -j "${KH_JOBS:-$(nproc)}" --out "$out"
    if [ -n "${KH_KERNEL_TREE:-}" ]; then
        set -- "$@" --kernel-tree "$KH_KERNEL_TREE"
    elif [ -n "${KH_KERNEL:-}" ]; then
        set -- "$@" --kernel "$KH_KERNEL"
        [ -n "${KH_MODULES:-}" ] && set -- "$@" --modules "$KH_MODULES"
        [ -n "${KH_CONFIG:-}" ] && set -- "$@" --config "$KH_CONFIG"
    fi
    rc=0
    "$here/.venv/bin/kdump-harness" matrix "$@" || rc=$?
    [ -f "$out/matrix.json" ] && collect
    exit $rc
    ;;
collect)
    collect
    ;;
*)
    echo "ci/nightly.sh: unknown command $cmd (run or collect)" >&2
    exit 2
    ;;
esac
