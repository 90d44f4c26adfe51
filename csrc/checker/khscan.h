/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * khscan.h - find kdump-harness marker records in a memory dump.
 *
 * A kh_dump is one opened dump: an ELF core (/proc/vmcore, QEMU
 * dump-guest-memory), a makedumpfile kdump-compressed file (plain or
 * flattened, read through libkdumpfile), or a raw guest-RAM file with
 * caller-given ranges. It knows which guest-physical bytes it holds, can read
 * them, and can scan all of them for marker records.
 *
 * Every function that can fail returns a kh_status and, when given one, fills
 * a struct kh_error with a one-line message. Nothing here prints, aborts or
 * exits. The Python wrapper (harness/checker.py) maps the status to an
 * exception in exactly one place.
 */
#ifndef KHSCAN_H
#define KHSCAN_H

#include <stddef.h>
#include <stdint.h>

enum kh_status {
	KH_OK = 0,
	KH_ERR_NOMEM = 1,	/* out of memory */
	KH_ERR_OS = 2,		/* a system call failed; see sys_errno */
	KH_ERR_FORMAT = 3,	/* the dump is malformed, truncated or corrupt */
	KH_ERR_UNSUPPORTED = 4,	/* well-formed, but a variant we do not read */
	KH_ERR_NOT_PRESENT = 5,	/* physical address not in the dump */
	KH_ERR_INVALID = 6,	/* bad argument from the caller */
	KH_ERR_READ = 7,	/* dump data could not be read (corrupt page) */
};

enum kh_format {
	KH_FORMAT_ELF = 1,
	KH_FORMAT_KDUMP = 2,
	KH_FORMAT_RAW = 3,
};

enum kh_hit_kind {
	KH_HIT_VALID = 0,	/* CRC good, nonce matches (or no nonce given) */
	KH_HIT_STALE = 1,	/* CRC good, another nonce */
	KH_HIT_TORN = 2,	/* magic matches, CRC does not */
};

#define KH_HIT_F_RESERVED_NONZERO 0x1u

#define KH_ERRMSG_MAX 256

struct kh_error {
	int status;
	int sys_errno;
	char msg[KH_ERRMSG_MAX];
};

/* One piece of a raw guest-RAM file: file bytes [file_offset,
 * file_offset+length) hold guest-physical [phys, phys+length). */
struct kh_raw_range {
	uint64_t file_offset;
	uint64_t phys;
	uint64_t length;
};

/* A run of physically contiguous bytes present in the dump. */
struct kh_range {
	uint64_t phys;
	uint64_t length;
};

/* One marker record found in the dump; 64 bytes, no padding. */
struct kh_hit {
	uint64_t phys;
	uint64_t nonce;
	uint64_t seq;
	uint64_t iova;
	uint64_t t_ns;
	uint32_t slot;
	uint16_t version;
	uint16_t source;
	uint32_t kind;		/* enum kh_hit_kind */
	uint32_t crc_stored;
	uint32_t crc_computed;
	uint32_t flags;		/* KH_HIT_F_* */
};

struct kh_open_opts {
	const struct kh_raw_range *raw;	/* non-NULL: a raw guest-RAM file */
	size_t nraw;
	const char *tmpdir;	/* where a flattened dump is reassembled;
				   NULL: $TMPDIR or /tmp */
};

struct kh_scan_opts {
	uint64_t nonce;
	int match_nonce;	/* 0: every valid record counts as valid */
	unsigned nthreads;	/* 0: one per online CPU, at most 8 */
	uint64_t max_valid;	/* listing bounds; counts are always exact */
	uint64_t max_stale;
	uint64_t max_torn;
	uint64_t max_unreadable;
};

struct kh_scan_result {
	struct kh_hit *hits;	/* sorted by phys; kinds mixed */
	size_t nhits;
	uint64_t n_valid;	/* totals, listed or not */
	uint64_t n_stale;
	uint64_t n_torn;
	uint64_t bytes_scanned;
	uint64_t unreadable_bytes;
	uint64_t n_unreadable;	/* number of unreadable ranges */
	struct kh_range *unreadable;	/* the first max_unreadable of them */
	size_t unreadable_listed;
	char unreadable_msg[KH_ERRMSG_MAX];	/* why the first one failed */
	unsigned nthreads;
};

typedef struct kh_dump kh_dump;

int kh_open(const char *path, const struct kh_open_opts *opts,
	    kh_dump **out, struct kh_error *err);
/* Like kh_open; fd stays the caller's (the dump works on a dup of it). */
int kh_open_fd(int fd, const struct kh_open_opts *opts,
	       kh_dump **out, struct kh_error *err);
void kh_close(kh_dump *d);

int kh_dump_format(const kh_dump *d);
int kh_dump_flattened(const kh_dump *d);
const char *kh_dump_format_detail(const kh_dump *d);
uint64_t kh_dump_file_size(const kh_dump *d);
size_t kh_dump_nranges(const kh_dump *d);
const struct kh_range *kh_dump_ranges(const kh_dump *d);
uint64_t kh_dump_total_bytes(const kh_dump *d);
/* ELF only: bytes of PT_LOAD data hidden because another PT_LOAD holds the
 * same physical address (kdump's kernel-text alias). */
uint64_t kh_dump_duplicate_bytes(const kh_dump *d);

int kh_read_phys(kh_dump *d, uint64_t phys, void *buf, size_t len,
		 struct kh_error *err);

int kh_scan(kh_dump *d, const struct kh_scan_opts *opts,
	    struct kh_scan_result **out, struct kh_error *err);
void kh_scan_result_free(struct kh_scan_result *r);

/* Benchmark baseline: mmap the file and count needle occurrences with one
 * plain single-threaded memmem() pass. */
int kh_bench_memmem(const char *path, const void *needle, size_t nlen,
		    uint64_t *count, struct kh_error *err);

#endif /* KHSCAN_H */
