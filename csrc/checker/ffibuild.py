"""cffi build script for harness._checker (out-of-line API mode).

setup.py names this file in ``cffi_modules``, so ``pip install -e .`` and wheel
builds compile csrc/checker/khscan.c into ``harness._checker``. Run it directly
(``python csrc/checker/ffibuild.py``) to build the module in place, next to
harness/markers.py, without installing anything.

Needs a C compiler and libkdumpfile's headers (Debian: libkdumpfile-dev) and
zlib's (zlib1g-dev, which libkdumpfile-dev pulls in).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig

import cffi

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _pkg_config(package: str) -> tuple[list[str], list[str], list[str]]:
    """(include_dirs, library_dirs, libraries) from pkg-config, or a plain
    -l<package> guess when pkg-config or its .pc file is missing."""
    pkg = shutil.which("pkg-config")
    if pkg:
        try:
            cflags = subprocess.run([pkg, "--cflags", package], check=True,
                                    capture_output=True, text=True).stdout
            libs = subprocess.run([pkg, "--libs", package], check=True,
                                  capture_output=True, text=True).stdout
        except (OSError, subprocess.CalledProcessError):
            pass
        else:
            inc = [f[2:] for f in shlex.split(cflags) if f.startswith("-I")]
            libdirs = [f[2:] for f in shlex.split(libs) if f.startswith("-L")]
            names = [f[2:] for f in shlex.split(libs) if f.startswith("-l")]
            return inc, libdirs, names
    return [], [], [package.removeprefix("lib")]


CDEF = """
enum kh_status {
    KH_OK = 0, KH_ERR_NOMEM = 1, KH_ERR_OS = 2, KH_ERR_FORMAT = 3,
    KH_ERR_UNSUPPORTED = 4, KH_ERR_NOT_PRESENT = 5, KH_ERR_INVALID = 6,
    KH_ERR_READ = 7,
};
enum kh_format { KH_FORMAT_ELF = 1, KH_FORMAT_KDUMP = 2, KH_FORMAT_RAW = 3 };
enum kh_hit_kind { KH_HIT_VALID = 0, KH_HIT_STALE = 1, KH_HIT_TORN = 2 };
#define KH_HIT_F_RESERVED_NONZERO ...
#define KH_ERRMSG_MAX ...

struct kh_error { int status; int sys_errno; char msg[...]; };
struct kh_raw_range { uint64_t file_offset; uint64_t phys; uint64_t length; };
struct kh_range { uint64_t phys; uint64_t length; };
struct kh_hit {
    uint64_t phys; uint64_t nonce; uint64_t seq; uint64_t iova; uint64_t t_ns;
    uint32_t slot; uint16_t version; uint16_t source;
    uint32_t kind; uint32_t crc_stored; uint32_t crc_computed; uint32_t flags;
};
struct kh_open_opts { const struct kh_raw_range *raw; size_t nraw; const char *tmpdir; };
struct kh_scan_opts {
    uint64_t nonce; int match_nonce; unsigned nthreads;
    uint64_t max_valid; uint64_t max_stale; uint64_t max_torn; uint64_t max_unreadable;
};
struct kh_scan_result {
    struct kh_hit *hits; size_t nhits;
    uint64_t n_valid; uint64_t n_stale; uint64_t n_torn;
    uint64_t bytes_scanned; uint64_t unreadable_bytes; uint64_t n_unreadable;
    struct kh_range *unreadable; size_t unreadable_listed;
    char unreadable_msg[...]; unsigned nthreads;
    ...;
};
typedef struct kh_dump kh_dump;

int kh_open(const char *path, const struct kh_open_opts *opts, kh_dump **out,
            struct kh_error *err);
int kh_open_fd(int fd, const struct kh_open_opts *opts, kh_dump **out,
               struct kh_error *err);
void kh_close(kh_dump *d);
int kh_dump_format(const kh_dump *d);
int kh_dump_flattened(const kh_dump *d);
const char *kh_dump_format_detail(const kh_dump *d);
uint64_t kh_dump_file_size(const kh_dump *d);
size_t kh_dump_nranges(const kh_dump *d);
const struct kh_range *kh_dump_ranges(const kh_dump *d);
uint64_t kh_dump_total_bytes(const kh_dump *d);
uint64_t kh_dump_duplicate_bytes(const kh_dump *d);
int kh_read_phys(kh_dump *d, uint64_t phys, void *buf, size_t len,
                 struct kh_error *err);
int kh_scan(kh_dump *d, const struct kh_scan_opts *opts,
            struct kh_scan_result **out, struct kh_error *err);
void kh_scan_result_free(struct kh_scan_result *r);
int kh_bench_memmem(const char *path, const void *needle, size_t nlen,
                    uint64_t *count, struct kh_error *err);
"""

def make_builder(relative: bool) -> cffi.FFI:
    """The FFI builder. setuptools wants source paths relative to the project
    root (its working directory during a build); an in-place build compiles
    in build/cffi and needs absolute ones."""

    def path(*parts: str) -> str:
        p = os.path.join(HERE, *parts)
        return os.path.relpath(p, ROOT) if relative else p

    inc, libdirs, libs = _pkg_config("libkdumpfile")
    builder = cffi.FFI()
    builder.cdef(CDEF)
    builder.set_source(
        "harness._checker",
        '#include "khscan.h"\n',
        sources=[path("khscan.c")],
        depends=[path("khscan.h"), path("khmarker.h")],
        include_dirs=[path(), *inc],
        library_dirs=libdirs,
        libraries=[*libs, "z", "pthread"],
        extra_compile_args=["-std=gnu11", "-O2", "-pthread", "-Wall", "-Wextra",
                            "-Wno-unused-parameter", "-D_FILE_OFFSET_BITS=64"],
        extra_link_args=["-pthread"],
    )
    return builder


ffibuilder = make_builder(relative=os.path.abspath(os.getcwd()) == ROOT)


def build_in_place() -> str:
    """Compile into build/cffi and put the extension next to harness/*.py under the
    name `pip install -e .` gives it (cffi builds for the stable ABI), replacing any
    older build so a stale module can never shadow a new one."""
    tmpdir = os.path.join(ROOT, "build", "cffi")
    os.makedirs(tmpdir, exist_ok=True)
    built = make_builder(relative=False).compile(tmpdir=tmpdir, verbose=True)
    pkg = os.path.join(ROOT, "harness")
    for name in os.listdir(pkg):
        if name.startswith("_checker.") and name.endswith(".so"):
            os.unlink(os.path.join(pkg, name))
    dest = os.path.join(pkg, "_checker.abi3.so" if _limited_api() else os.path.basename(built))
    shutil.copy2(built, dest)
    return dest


def _limited_api() -> bool:
    """What cffi's setuptools integration decides: the stable ABI on a regular
    (non-debug, GIL) CPython, which setuptools names *.abi3.so."""
    return (sys.implementation.name == "cpython" and not hasattr(sys, "gettotalrefcount")
            and not sysconfig.get_config_var("Py_GIL_DISABLED"))


if __name__ == "__main__":
    print(build_in_place(), file=sys.stderr)
