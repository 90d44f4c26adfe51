// SPDX-License-Identifier: GPL-2.0-only
/*
 * libFuzzer target for the checker: every input is written to a memfd and
 * opened as a dump (format by magic, so ELF, kdump-compressed and flattened
 * paths are all reached), then its ranges are read and it is scanned. The
 * same bytes are also opened as raw guest RAM with ranges taken from the
 * input. Built with -fsanitize=fuzzer,address,undefined by build.sh.
 *
 * Besides sanitizer reports, the target aborts when a result breaks an
 * invariant of the API (hits unsorted, bounds exceeded, counts inconsistent).
 */
#define _GNU_SOURCE
#include "khscan.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define CHECK(cond) do { if (!(cond)) { \
	fprintf(stderr, "invariant failed: %s (%s:%d)\n", #cond, __FILE__, __LINE__); \
	abort(); } } while (0)

static void check_error(int rc, const struct kh_error *err)
{
	if (rc == KH_OK)
		return;
	CHECK(rc > 0 && rc <= KH_ERR_READ);
	CHECK(memchr(err->msg, '\0', sizeof err->msg) != NULL);
	CHECK(err->msg[0] != '\0');
	CHECK(strchr(err->msg, '\n') == NULL);
}

static void exercise(kh_dump *d, unsigned threads)
{
	const struct kh_range *r = kh_dump_ranges(d);
	size_t n = kh_dump_nranges(d), i;
	uint64_t total = 0;
	uint8_t buf[128];
	struct kh_error err;
	struct kh_scan_opts opts = {
		.nonce = 0x5EED000000000001ull, .match_nonce = 1, .nthreads = threads,
		.max_valid = 8, .max_stale = 4, .max_torn = 4, .max_unreadable = 4,
	};
	struct kh_scan_result *res = NULL;
	int rc;

	for (i = 0; i < n; ++i) {
		CHECK(r[i].length > 0);
		CHECK(i == 0 || r[i].phys > r[i - 1].phys + r[i - 1].length - 1);
		total += r[i].length;
	}
	CHECK(total == kh_dump_total_bytes(d));
	for (i = 0; i < n && i < 8; ++i) {
		size_t len = r[i].length < sizeof buf ? (size_t)r[i].length : sizeof buf;
		rc = kh_read_phys(d, r[i].phys, buf, len, &err);
		check_error(rc, &err);
		CHECK(rc == KH_OK || rc == KH_ERR_READ);
		rc = kh_read_phys(d, r[i].phys + r[i].length - len, buf, len, &err);
		check_error(rc, &err);
		CHECK(rc == KH_OK || rc == KH_ERR_READ);
		if (r[i].phys + r[i].length != 0 &&
		    (i + 1 == n || r[i + 1].phys != r[i].phys + r[i].length)) {
			/* Never KH_ERR_READ, even when the range's last page is
			 * corrupt: kh_read_phys() checks that every byte is
			 * present before it reads any page. */
			rc = kh_read_phys(d, r[i].phys + r[i].length - 1, buf, 2, &err);
			check_error(rc, &err);
			CHECK(rc == KH_ERR_NOT_PRESENT || rc == KH_ERR_INVALID);
		}
	}
	rc = kh_scan(d, &opts, &res, &err);
	check_error(rc, &err);
	if (rc != KH_OK)
		return;
	CHECK(res->nhits <= 16);
	CHECK(res->unreadable_listed <= 4 && res->unreadable_listed <= res->n_unreadable);
	CHECK(res->bytes_scanned + res->unreadable_bytes == kh_dump_total_bytes(d));
	for (i = 0; i < res->nhits; ++i) {
		CHECK(res->hits[i].kind <= KH_HIT_TORN);
		CHECK(i == 0 || res->hits[i].phys >= res->hits[i - 1].phys);
		CHECK(kh_read_phys(d, res->hits[i].phys, buf, 64, &err) == KH_OK);
		CHECK(memcmp(buf, "KDH-MRK1", 8) == 0);
	}
	kh_scan_result_free(res);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	int fd = memfd_create("khfuzz", MFD_CLOEXEC);
	struct kh_open_opts opts = { .tmpdir = getenv("KH_FUZZ_TMPDIR") };
	struct kh_error err;
	kh_dump *d = NULL;
	unsigned threads = size ? 1 + (data[size - 1] & 1) : 1;
	int rc;

	if (fd < 0)
		return 0;
	if (size && write(fd, data, size) != (ssize_t)size) {
		close(fd);
		return 0;
	}
	rc = kh_open_fd(fd, &opts, &d, &err);
	check_error(rc, &err);
	if (rc == KH_OK) {
		exercise(d, threads);
		kh_close(d);
	}

	/* raw guest RAM: two ranges read from the input's first 24 bytes */
	if (size >= 24) {
		struct kh_raw_range rr[2];
		uint64_t w[3];
		memcpy(w, data, sizeof w);
		rr[0] = (struct kh_raw_range){ w[0] % (size + 1), w[1] & 0xffffff, w[2] % (size + 1) };
		rr[1] = (struct kh_raw_range){ w[2] % (size + 1), (w[1] >> 24) + rr[0].phys, w[0] % 4097 };
		opts.raw = rr;
		opts.nraw = 1 + (w[1] >> 63);
		rc = kh_open_fd(fd, &opts, &d, &err);
		check_error(rc, &err);
		if (rc == KH_OK) {
			exercise(d, threads);
			kh_close(d);
		}
	}
	close(fd);
	return 0;
}
