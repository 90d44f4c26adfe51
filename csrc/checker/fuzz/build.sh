#!/bin/sh
# Build the libFuzzer + ASan + UBSan target for the checker.
#   csrc/checker/fuzz/build.sh [OUTDIR]      (default: build/fuzz)
# Needs clang and its runtime (Debian: apt-get install clang libclang-rt-14-dev).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-build/fuzz}
cc=${CC:-clang}
mkdir -p "$out"
# shellcheck disable=SC2046
"$cc" -g -O1 -fno-omit-frame-pointer \
	-fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
	-std=gnu11 -D_FILE_OFFSET_BITS=64 -pthread \
	-I"$here/.." $(pkg-config --cflags libkdumpfile 2>/dev/null) \
	"$here/fuzz_khscan.c" "$here/../khscan.c" \
	-o "$out/fuzz_khscan" \
	$(pkg-config --libs libkdumpfile 2>/dev/null || echo -lkdumpfile) -lz -pthread
echo "$out/fuzz_khscan"
