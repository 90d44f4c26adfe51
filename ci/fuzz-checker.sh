#!/bin/sh
# Longer libFuzzer + ASan + UBSan run of the checker's open/parse/scan path.
#
#   ci/fuzz-checker.sh [SECONDS] [JOBS]      (default: 600 seconds, 1 job)
#
# The corpus persists in build/fuzz/corpus between runs; crashes land in
# build/fuzz/artifacts/. Exit status is libFuzzer's: 0 when nothing was found.
# Needs clang and its runtime (Debian: apt-get install clang libclang-rt-14-dev).
set -eu
cd "$(dirname "$0")/.."
seconds=${1:-600}
jobs=${2:-1}
out=build/fuzz
python=${PYTHON:-python3}
[ -x .venv/bin/python ] && python=${PYTHON:-.venv/bin/python}

csrc/checker/fuzz/build.sh "$out" >/dev/null
"$python" csrc/checker/fuzz/make_seeds.py "$out/seeds"
mkdir -p "$out/corpus" "$out/artifacts" "$out/tmp"
export KH_FUZZ_TMPDIR="$PWD/$out/tmp"
export ASAN_OPTIONS="detect_leaks=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
echo "fuzzing the checker for $seconds s with $jobs job(s); corpus $out/corpus" >&2
set -- -max_total_time="$seconds" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
	-print_final_stats=1 -artifact_prefix="$out/artifacts/"
# -jobs runs children that log to fuzz-N.log; only use it for more than one
[ "$jobs" -gt 1 ] && set -- "$@" -jobs="$jobs" -workers="$jobs"
exec "$out/fuzz_khscan" "$@" "$out/corpus" "$out/seeds"
