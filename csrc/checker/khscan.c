// SPDX-License-Identifier: GPL-2.0-only
/*
 * khscan.c - open a memory dump and find kdump-harness marker records in it.
 *
 * The dump is hostile input: every offset and length read from it is checked
 * against the file size (with overflow checks) before it is used, nothing is
 * read past a mapping, and every failure comes back as a status code plus a
 * one-line message in struct kh_error.
 *
 * Formats:
 *  - ELF64 cores (/proc/vmcore, QEMU dump-guest-memory): mmapped and read
 *    directly. PT_LOADs may overlap (kdump maps kernel text twice); each
 *    physical byte is taken from one PT_LOAD, chosen by resolve_pieces().
 *  - makedumpfile kdump-compressed ("KDUMP   " / "DISKDUMP"): the header,
 *    bitmap and page descriptors are checked here, then libkdumpfile reads
 *    (and decompresses) the pages.
 *  - makedumpfile flattened form ("makedumpfile" signature, also what QEMU 7.2
 *    dump-guest-memory writes for kdump-* formats): libkdumpfile 0.5.1 cannot
 *    read it (flattened support arrived in 0.5.3), so it is reassembled into
 *    an unlinked temporary file first, the same thing `makedumpfile -R` does.
 *  - raw guest-RAM files with caller-given (file_offset, phys, length) ranges.
 */
#define _GNU_SOURCE

#include "khscan.h"
#include "khmarker.h"

#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <zlib.h>
#include <libkdumpfile/kdumpfile.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define KH_X86 1
#endif

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "khscan.c reads little-endian ELF headers in place; port it first"
#endif

/* Bounds on what a dump may ask of us. */
#define KH_MAX_PHNUM		(1u << 20)
#define KH_MAX_SEGS		(1u << 24)
#define KH_MAX_READ		((size_t)1 << 32)
#define KH_STREAM_CHUNK		((size_t)1 << 20)
#define KH_MAX_THREADS		8
#define KH_MIN_BYTES_PER_THREAD	((uint64_t)16 << 20)
#define KH_KDUMP_CACHE_PAGES	(4 * (KH_MAX_THREADS + 2))

/* makedumpfile flattened format */
#define MDF_SIGNATURE		"makedumpfile"
#define MDF_HEADER_SIZE		4096
#define MDF_TYPE_FLAT_HEADER	1
#define MDF_VERSION_FLAT_HEADER	1
#define MDF_WBUF_SIZE		((size_t)4 << 20)

/* makedumpfile kdump-compressed format */
#define DD_MIN_BLOCK		4096u
#define DD_MAX_BLOCK		262144u
#define DD_PAGE_DESC_SIZE	24
#define DD_COMPRESSED		(0x1 | 0x2 | 0x4 | 0x20)

enum seg_kind {
	SEG_FILE,	/* bytes at file_off in the mapping */
	SEG_ZERO,	/* ELF p_memsz beyond p_filesz: zeros */
	SEG_KDUMP,	/* pages read through libkdumpfile */
};

struct seg {
	uint64_t phys;
	uint64_t len;
	uint64_t file_off;
	int kind;
};

struct kh_dump {
	int format;
	int flattened;
	char detail[192];

	int fd;			/* the file the data is read from */
	uint64_t file_size;	/* size of the file the caller named */
	uint64_t data_size;	/* size of fd (differs once reassembled) */
	const uint8_t *map;
	size_t map_len;

	struct seg *segs;	/* sorted by phys, non-overlapping */
	size_t nsegs;
	struct kh_range *ranges;	/* segs merged where contiguous */
	size_t nranges;
	uint64_t total_bytes;
	uint64_t duplicate_bytes;

	kdump_ctx_t *kctx;
	pthread_mutex_t klock;	/* serialises use of kctx */
	int klock_ready;
	uint64_t page_size;
};

/* ------------------------------------------------------------------ */
/* errors */

static int seterr(struct kh_error *err, int status, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static int seterr(struct kh_error *err, int status, const char *fmt, ...)
{
	if (err) {
		va_list ap;
		err->status = status;
		err->sys_errno = 0;
		va_start(ap, fmt);
		vsnprintf(err->msg, sizeof err->msg, fmt, ap);
		va_end(ap);
	}
	return status;
}

static int seterr_os(struct kh_error *err, int errnum, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static int seterr_os(struct kh_error *err, int errnum, const char *fmt, ...)
{
	if (err) {
		va_list ap;
		size_t n;
		err->status = KH_ERR_OS;
		err->sys_errno = errnum;
		va_start(ap, fmt);
		vsnprintf(err->msg, sizeof err->msg, fmt, ap);
		va_end(ap);
		n = strlen(err->msg);
		snprintf(err->msg + n, sizeof err->msg - n, ": %s",
			 strerror(errnum));
	}
	return KH_ERR_OS;
}

static int nomem(struct kh_error *err)
{
	return seterr(err, KH_ERR_NOMEM, "out of memory");
}

/* Copy a message that came from elsewhere, keeping it on one line. */
static void copy_oneline(char *dst, size_t dstlen, const char *src)
{
	size_t i;
	if (!dstlen)
		return;
	for (i = 0; src && src[i] && i + 1 < dstlen; ++i)
		dst[i] = (src[i] == '\n' || src[i] == '\r') ? ' ' : src[i];
	dst[i] = '\0';
}

static int kdump_error(struct kh_error *err, kdump_ctx_t *ctx,
		       kdump_status st, const char *what)
{
	char msg[KH_ERRMSG_MAX];
	int status = (st == KDUMP_ERR_NOTIMPL) ? KH_ERR_UNSUPPORTED
		: (st == KDUMP_ERR_SYSTEM && errno == ENOMEM) ? KH_ERR_NOMEM
		: KH_ERR_FORMAT;
	copy_oneline(msg, sizeof msg, kdump_get_err(ctx));
	return seterr(err, status, "%s: libkdumpfile: %s", what,
		      msg[0] ? msg : kdump_strerror(st));
}

/* ------------------------------------------------------------------ */
/* small helpers */

static inline bool add_ok(uint64_t a, uint64_t b, uint64_t *sum)
{
	return !__builtin_add_overflow(a, b, sum);
}

static inline bool mul_ok(uint64_t a, uint64_t b, uint64_t *prod)
{
	return !__builtin_mul_overflow(a, b, prod);
}

/* [off, off+len) lies inside a file of `size` bytes */
static inline bool in_file(uint64_t off, uint64_t len, uint64_t size)
{
	return off <= size && len <= size - off;
}

static inline uint64_t min_u64(uint64_t a, uint64_t b)
{
	return a < b ? a : b;
}

static inline uint64_t be64(const uint8_t *p)
{
	uint64_t v;
	memcpy(&v, p, 8);
	return __builtin_bswap64(v);
}

static inline uint32_t rd32(const uint8_t *p, int be)
{
	uint32_t v;
	memcpy(&v, p, 4);
	return be ? __builtin_bswap32(v) : v;
}

static inline uint64_t rd64(const uint8_t *p, int be)
{
	uint64_t v;
	memcpy(&v, p, 8);
	return be ? __builtin_bswap64(v) : v;
}

static int pread_full(int fd, void *buf, size_t len, uint64_t off,
		      struct kh_error *err)
{
	uint8_t *p = buf;
	while (len) {
		ssize_t n = pread(fd, p, len, (off_t)off);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return seterr_os(err, errno, "read at offset %llu",
					 (unsigned long long)off);
		}
		if (n == 0)
			return seterr(err, KH_ERR_FORMAT,
				      "unexpected end of file at offset %llu",
				      (unsigned long long)off);
		p += n;
		off += (uint64_t)n;
		len -= (size_t)n;
	}
	return KH_OK;
}

static int pwrite_full(int fd, const void *buf, size_t len, uint64_t off,
		       struct kh_error *err)
{
	const uint8_t *p = buf;
	while (len) {
		ssize_t n = pwrite(fd, p, len, (off_t)off);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return seterr_os(err, errno,
					 "cannot write reassembled dump");
		}
		p += n;
		off += (uint64_t)n;
		len -= (size_t)n;
	}
	return KH_OK;
}

/* ------------------------------------------------------------------ */
/* finding the magic */

typedef size_t (*find_fn)(const uint8_t *buf, size_t from, size_t npos);

/*
 * Each find function returns the first position p in [from, npos) where the
 * 8 magic bytes start, or npos. The caller guarantees buf[0 .. npos+63) is
 * readable (a record needs 64 bytes), so loads up to 7+64 bytes past a
 * position below npos-64 stay in bounds.
 */
static size_t find_scalar(const uint8_t *buf, size_t from, size_t npos)
{
	const uint64_t magic = kh_magic_u64();
	size_t p = from;
	while (p < npos) {
		const uint8_t *q = memchr(buf + p, KH_MAGIC[0], npos - p);
		uint64_t v;
		if (!q)
			return npos;
		p = (size_t)(q - buf);
		memcpy(&v, q, 8);
		if (v == magic)
			return p;
		++p;
	}
	return npos;
}

#ifdef KH_X86
static size_t find_sse2(const uint8_t *buf, size_t from, size_t npos)
{
	const __m128i first = _mm_set1_epi8(KH_MAGIC[0]);
	const __m128i last = _mm_set1_epi8(KH_MAGIC[7]);
	const uint64_t magic = kh_magic_u64();
	size_t o = from;

	while (o + 32 <= npos) {
		__m128i a0 = _mm_loadu_si128((const __m128i *)(buf + o));
		__m128i a1 = _mm_loadu_si128((const __m128i *)(buf + o + 16));
		__m128i b0 = _mm_loadu_si128((const __m128i *)(buf + o + 7));
		__m128i b1 = _mm_loadu_si128((const __m128i *)(buf + o + 23));
		uint32_t m = (uint32_t)_mm_movemask_epi8(_mm_and_si128(
				_mm_cmpeq_epi8(a0, first),
				_mm_cmpeq_epi8(b0, last))) |
			(uint32_t)_mm_movemask_epi8(_mm_and_si128(
				_mm_cmpeq_epi8(a1, first),
				_mm_cmpeq_epi8(b1, last))) << 16;
		while (m) {
			size_t p = o + (size_t)__builtin_ctz(m);
			uint64_t v;
			memcpy(&v, buf + p, 8);
			if (v == magic)
				return p;
			m &= m - 1;
		}
		o += 32;
	}
	return find_scalar(buf, o, npos);
}

__attribute__((target("avx2")))
static size_t find_avx2(const uint8_t *buf, size_t from, size_t npos)
{
	const __m256i first = _mm256_set1_epi8(KH_MAGIC[0]);
	const __m256i last = _mm256_set1_epi8(KH_MAGIC[7]);
	const uint64_t magic = kh_magic_u64();
	size_t o = from;

	while (o + 128 <= npos) {
		const uint8_t *q = buf + o;
		__m256i e0 = _mm256_and_si256(
			_mm256_cmpeq_epi8(_mm256_loadu_si256((const __m256i *)q), first),
			_mm256_cmpeq_epi8(_mm256_loadu_si256((const __m256i *)(q + 7)), last));
		__m256i e1 = _mm256_and_si256(
			_mm256_cmpeq_epi8(_mm256_loadu_si256((const __m256i *)(q + 32)), first),
			_mm256_cmpeq_epi8(_mm256_loadu_si256((const __m256i *)(q + 39)), last));
		__m256i e2 = _mm256_and_si256(
			_mm256_cmpeq_epi8(_mm256_loadu_si256((const __m256i *)(q + 64)), first),
			_mm256_cmpeq_epi8(_mm256_loadu_si256((const __m256i *)(q + 71)), last));
		__m256i e3 = _mm256_and_si256(
			_mm256_cmpeq_epi8(_mm256_loadu_si256((const __m256i *)(q + 96)), first),
			_mm256_cmpeq_epi8(_mm256_loadu_si256((const __m256i *)(q + 103)), last));
		__m256i any = _mm256_or_si256(_mm256_or_si256(e0, e1),
					      _mm256_or_si256(e2, e3));
		if (!_mm256_testz_si256(any, any)) {
			__m256i e[4] = { e0, e1, e2, e3 };
			int k;
			for (k = 0; k < 4; ++k) {
				uint32_t m = (uint32_t)_mm256_movemask_epi8(e[k]);
				while (m) {
					size_t p = o + 32 * (size_t)k +
						(size_t)__builtin_ctz(m);
					uint64_t v;
					memcpy(&v, buf + p, 8);
					if (v == magic)
						return p;
					m &= m - 1;
				}
			}
		}
		o += 128;
	}
	return find_sse2(buf, o, npos);
}
#endif

static find_fn pick_find(void)
{
#ifdef KH_X86
	__builtin_cpu_init();
	if (__builtin_cpu_supports("avx2"))
		return find_avx2;
	return find_sse2;
#else
	return find_scalar;
#endif
}

/* ------------------------------------------------------------------ */
/* segments and ranges */

static int build_ranges(struct kh_dump *d, struct kh_error *err)
{
	size_t i, n = 0;

	d->total_bytes = 0;
	free(d->ranges);
	d->ranges = NULL;
	d->nranges = 0;
	if (!d->nsegs)
		return KH_OK;
	d->ranges = calloc(d->nsegs, sizeof *d->ranges);
	if (!d->ranges)
		return nomem(err);
	for (i = 0; i < d->nsegs; ++i) {
		const struct seg *s = &d->segs[i];
		d->total_bytes += s->len;
		if (n && d->ranges[n - 1].phys + d->ranges[n - 1].length == s->phys) {
			d->ranges[n - 1].length += s->len;
		} else {
			d->ranges[n].phys = s->phys;
			d->ranges[n].length = s->len;
			++n;
		}
	}
	d->nranges = n;
	return KH_OK;
}

/* Index of the segment holding phys, or d->nsegs. */
static size_t find_seg(const struct kh_dump *d, uint64_t phys)
{
	size_t lo = 0, hi = d->nsegs;
	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		if (d->segs[mid].phys <= phys)
			lo = mid + 1;
		else
			hi = mid;
	}
	if (lo == 0)
		return d->nsegs;
	--lo;
	if (phys - d->segs[lo].phys < d->segs[lo].len)
		return lo;
	return d->nsegs;
}

struct piece {
	uint64_t start, end, file_off;
	uint32_t index;		/* program header index */
	uint32_t rank;		/* 0 wins */
	int kind;
};

static int piece_priority_cmp(const void *a, const void *b)
{
	const struct piece *x = a, *y = b;
	uint64_t lx = x->end - x->start, ly = y->end - y->start;
	/* data beats zero-fill, bigger beats smaller, earlier beats later */
	if ((x->kind == SEG_ZERO) != (y->kind == SEG_ZERO))
		return x->kind == SEG_ZERO ? 1 : -1;
	if (lx != ly)
		return lx > ly ? -1 : 1;
	return x->index < y->index ? -1 : x->index > y->index;
}

static int piece_start_cmp(const void *a, const void *b)
{
	const struct piece *x = a, *y = b;
	if (x->start != y->start)
		return x->start < y->start ? -1 : 1;
	return 0;
}

struct event {
	uint64_t pos;
	uint32_t piece;
	uint32_t is_start;
};

static int event_cmp(const void *a, const void *b)
{
	const struct event *x = a, *y = b;
	if (x->pos != y->pos)
		return x->pos < y->pos ? -1 : 1;
	return 0;
}

/* min-heap of piece indices, keyed by rank (= index after sorting) */
static void heap_push(uint32_t *h, size_t *n, uint32_t v)
{
	size_t i = (*n)++;
	while (i) {
		size_t parent = (i - 1) / 2;
		if (h[parent] <= v)
			break;
		h[i] = h[parent];
		i = parent;
	}
	h[i] = v;
}

static void heap_pop(uint32_t *h, size_t *n)
{
	uint32_t v = h[--(*n)];
	size_t i = 0;
	for (;;) {
		size_t c = 2 * i + 1;
		if (c >= *n)
			break;
		if (c + 1 < *n && h[c + 1] < h[c])
			++c;
		if (v <= h[c])
			break;
		h[i] = h[c];
		i = c;
	}
	if (*n)
		h[i] = v;
}

/*
 * Turn possibly overlapping pieces into d->segs: for every physical byte the
 * highest-priority piece holding it wins (piece_priority_cmp). A sweep over
 * the sorted start/end points with a heap of active pieces keeps this
 * O(n log n) whatever the dump claims.
 */
static int resolve_pieces(struct kh_dump *d, struct piece *pc, size_t npc,
			  struct kh_error *err)
{
	struct event *ev = NULL;
	uint32_t *heap = NULL;
	uint8_t *active = NULL;
	size_t nev = 0, nheap = 0, i, nsegs = 0, cap = 0;
	struct seg *segs = NULL;
	uint64_t prev = 0, piece_bytes = 0;
	int ret = KH_OK;

	qsort(pc, npc, sizeof *pc, piece_priority_cmp);
	ev = malloc(2 * npc * sizeof *ev);
	heap = malloc(npc * sizeof *heap);
	active = calloc(npc ? npc : 1, 1);
	if (!ev || !heap || !active) {
		ret = nomem(err);
		goto out;
	}
	for (i = 0; i < npc; ++i) {
		piece_bytes += pc[i].end - pc[i].start;
		ev[nev++] = (struct event){ pc[i].start, (uint32_t)i, 1 };
		ev[nev++] = (struct event){ pc[i].end, (uint32_t)i, 0 };
	}
	qsort(ev, nev, sizeof *ev, event_cmp);

	for (i = 0; i < nev;) {
		uint64_t pos = ev[i].pos;
		if (nheap && pos > prev) {
			const struct piece *w = &pc[heap[0]];
			if (nsegs && segs[nsegs - 1].phys + segs[nsegs - 1].len == prev &&
			    segs[nsegs - 1].kind == w->kind &&
			    (w->kind != SEG_FILE ||
			     segs[nsegs - 1].file_off + segs[nsegs - 1].len ==
			     w->file_off + (prev - w->start))) {
				segs[nsegs - 1].len += pos - prev;
			} else {
				if (nsegs == cap) {
					size_t ncap = cap ? 2 * cap : 16;
					struct seg *ns;
					if (ncap > KH_MAX_SEGS) {
						ret = seterr(err, KH_ERR_FORMAT,
							     "too many memory segments");
						goto out;
					}
					ns = realloc(segs, ncap * sizeof *ns);
					if (!ns) {
						ret = nomem(err);
						goto out;
					}
					segs = ns;
					cap = ncap;
				}
				segs[nsegs++] = (struct seg){
					.phys = prev,
					.len = pos - prev,
					.file_off = w->file_off + (prev - w->start),
					.kind = w->kind,
				};
			}
		}
		for (; i < nev && ev[i].pos == pos; ++i) {
			if (ev[i].is_start) {
				active[ev[i].piece] = 1;
				heap_push(heap, &nheap, ev[i].piece);
			} else {
				active[ev[i].piece] = 0;
			}
		}
		while (nheap && !active[heap[0]])
			heap_pop(heap, &nheap);
		prev = pos;
	}

	free(d->segs);
	d->segs = segs;
	d->nsegs = nsegs;
	segs = NULL;
	d->duplicate_bytes = piece_bytes;
	for (i = 0; i < d->nsegs; ++i)
		d->duplicate_bytes -= d->segs[i].len;
	ret = build_ranges(d, err);
out:
	free(segs);
	free(ev);
	free(heap);
	free(active);
	return ret;
}

static int map_data(struct kh_dump *d, struct kh_error *err)
{
	void *m;
	if (d->data_size > SIZE_MAX)
		return seterr(err, KH_ERR_UNSUPPORTED, "file too large to map");
	m = mmap(NULL, (size_t)d->data_size, PROT_READ, MAP_SHARED, d->fd, 0);
	if (m == MAP_FAILED)
		return seterr_os(err, errno, "cannot mmap the dump");
	d->map = m;
	d->map_len = (size_t)d->data_size;
	return KH_OK;
}

/* ------------------------------------------------------------------ */
/* ELF */

static int open_elf(struct kh_dump *d, struct kh_error *err)
{
	const uint64_t size = d->data_size;
	Elf64_Ehdr eh;
	uint64_t phnum, table_len, i;
	struct piece *pc = NULL;
	size_t npc = 0, nload = 0;
	int ret;

	if (size < EI_NIDENT)
		return seterr(err, KH_ERR_FORMAT,
			      "truncated ELF header (%llu bytes)",
			      (unsigned long long)size);
	ret = map_data(d, err);
	if (ret)
		return ret;
	if (d->map[EI_CLASS] == ELFCLASS32)
		return seterr(err, KH_ERR_UNSUPPORTED,
			      "32-bit ELF dumps are not supported");
	if (d->map[EI_CLASS] != ELFCLASS64)
		return seterr(err, KH_ERR_FORMAT, "bad ELF class %u",
			      d->map[EI_CLASS]);
	if (d->map[EI_DATA] == ELFDATA2MSB)
		return seterr(err, KH_ERR_UNSUPPORTED,
			      "big-endian ELF dumps are not supported");
	if (d->map[EI_DATA] != ELFDATA2LSB)
		return seterr(err, KH_ERR_FORMAT, "bad ELF data encoding %u",
			      d->map[EI_DATA]);
	if (size < sizeof eh)
		return seterr(err, KH_ERR_FORMAT,
			      "truncated ELF header (%llu of %zu bytes)",
			      (unsigned long long)size, sizeof eh);
	memcpy(&eh, d->map, sizeof eh);
	if (eh.e_type != ET_CORE)
		return seterr(err, KH_ERR_FORMAT,
			      "ELF file is not a core dump (e_type %u)", eh.e_type);
	if (eh.e_phentsize < sizeof(Elf64_Phdr))
		return seterr(err, KH_ERR_FORMAT,
			      "bad ELF program header size %u", eh.e_phentsize);

	phnum = eh.e_phnum;
	if (phnum == PN_XNUM) {
		Elf64_Shdr sh;
		if (eh.e_shoff == 0 || eh.e_shentsize < sizeof sh ||
		    !in_file(eh.e_shoff, sizeof sh, size))
			return seterr(err, KH_ERR_FORMAT,
				      "ELF e_phnum is PN_XNUM but section 0 is "
				      "missing or truncated");
		memcpy(&sh, d->map + eh.e_shoff, sizeof sh);
		phnum = sh.sh_info;
	}
	if (phnum == 0)
		return seterr(err, KH_ERR_FORMAT, "ELF core has no program headers");
	if (phnum > KH_MAX_PHNUM)
		return seterr(err, KH_ERR_FORMAT,
			      "ELF core claims %llu program headers",
			      (unsigned long long)phnum);
	if (!mul_ok(phnum, eh.e_phentsize, &table_len) ||
	    !in_file(eh.e_phoff, table_len, size))
		return seterr(err, KH_ERR_FORMAT,
			      "ELF program header table (offset %llu, %llu entries)"
			      " extends past end of file (%llu bytes): truncated?",
			      (unsigned long long)eh.e_phoff,
			      (unsigned long long)phnum, (unsigned long long)size);

	pc = calloc(2 * phnum, sizeof *pc);
	if (!pc)
		return nomem(err);
	for (i = 0; i < phnum; ++i) {
		Elf64_Phdr ph;
		uint64_t end;
		memcpy(&ph, d->map + eh.e_phoff + i * eh.e_phentsize, sizeof ph);
		if (ph.p_type != PT_LOAD)
			continue;
		++nload;
		if (ph.p_filesz > ph.p_memsz) {
			ret = seterr(err, KH_ERR_FORMAT,
				     "PT_LOAD #%llu: p_filesz %#llx > p_memsz %#llx",
				     (unsigned long long)i,
				     (unsigned long long)ph.p_filesz,
				     (unsigned long long)ph.p_memsz);
			goto out;
		}
		if (ph.p_filesz && !in_file(ph.p_offset, ph.p_filesz, size)) {
			ret = seterr(err, KH_ERR_FORMAT,
				     "PT_LOAD #%llu (file bytes %#llx+%#llx) extends "
				     "past end of file (%llu bytes): truncated dump?",
				     (unsigned long long)i,
				     (unsigned long long)ph.p_offset,
				     (unsigned long long)ph.p_filesz,
				     (unsigned long long)size);
			goto out;
		}
		if (!add_ok(ph.p_paddr, ph.p_memsz, &end)) {
			ret = seterr(err, KH_ERR_FORMAT,
				     "PT_LOAD #%llu: physical range %#llx+%#llx "
				     "wraps around", (unsigned long long)i,
				     (unsigned long long)ph.p_paddr,
				     (unsigned long long)ph.p_memsz);
			goto out;
		}
		if (ph.p_filesz)
			pc[npc++] = (struct piece){
				.start = ph.p_paddr,
				.end = ph.p_paddr + ph.p_filesz,
				.file_off = ph.p_offset,
				.index = (uint32_t)i,
				.kind = SEG_FILE,
			};
		if (ph.p_memsz > ph.p_filesz)
			pc[npc++] = (struct piece){
				.start = ph.p_paddr + ph.p_filesz,
				.end = end,
				.index = (uint32_t)i,
				.kind = SEG_ZERO,
			};
	}
	if (!nload) {
		ret = seterr(err, KH_ERR_FORMAT,
			     "ELF core has no PT_LOAD segments (no memory in it)");
		goto out;
	}
	ret = resolve_pieces(d, pc, npc, err);
	if (ret)
		goto out;
	d->format = KH_FORMAT_ELF;
	snprintf(d->detail, sizeof d->detail,
		 "ELF64 core, e_machine %u, %zu PT_LOAD", eh.e_machine, nload);
out:
	free(pc);
	return ret;
}

/* ------------------------------------------------------------------ */
/* raw guest RAM */

static int open_raw(struct kh_dump *d, const struct kh_raw_range *raw,
		    size_t nraw, struct kh_error *err)
{
	struct piece *pc;
	size_t i;
	int ret;

	if (nraw == 0)
		return seterr(err, KH_ERR_INVALID, "no raw ranges given");
	if (nraw > KH_MAX_PHNUM)
		return seterr(err, KH_ERR_INVALID, "too many raw ranges");
	pc = calloc(nraw, sizeof *pc);
	if (!pc)
		return nomem(err);
	for (i = 0; i < nraw; ++i) {
		uint64_t end;
		if (raw[i].length == 0) {
			ret = seterr(err, KH_ERR_INVALID, "raw range #%zu is empty", i);
			goto out;
		}
		if (!in_file(raw[i].file_offset, raw[i].length, d->data_size)) {
			ret = seterr(err, KH_ERR_INVALID,
				     "raw range #%zu (file bytes %#llx+%#llx) "
				     "extends past end of file (%llu bytes)", i,
				     (unsigned long long)raw[i].file_offset,
				     (unsigned long long)raw[i].length,
				     (unsigned long long)d->data_size);
			goto out;
		}
		if (!add_ok(raw[i].phys, raw[i].length, &end)) {
			ret = seterr(err, KH_ERR_INVALID,
				     "raw range #%zu wraps around the address space", i);
			goto out;
		}
		pc[i] = (struct piece){ raw[i].phys, end, raw[i].file_offset,
					(uint32_t)i, 0, SEG_FILE };
	}
	/* caller ranges must not overlap: there is no right answer */
	{
		struct piece *s = malloc(nraw * sizeof *s);
		if (!s) {
			ret = nomem(err);
			goto out;
		}
		memcpy(s, pc, nraw * sizeof *s);
		qsort(s, nraw, sizeof *s, piece_start_cmp);
		for (i = 1; i < nraw; ++i) {
			if (s[i].start < s[i - 1].end) {
				ret = seterr(err, KH_ERR_INVALID,
					     "raw ranges #%u and #%u overlap at "
					     "physical %#llx", s[i - 1].index,
					     s[i].index,
					     (unsigned long long)s[i].start);
				free(s);
				goto out;
			}
		}
		free(s);
	}
	ret = map_data(d, err);
	if (ret)
		goto out;
	ret = resolve_pieces(d, pc, nraw, err);
	if (ret)
		goto out;
	d->format = KH_FORMAT_RAW;
	snprintf(d->detail, sizeof d->detail, "raw guest RAM, %zu ranges", nraw);
out:
	free(pc);
	return ret;
}

/* ------------------------------------------------------------------ */
/* kdump-compressed: checks before libkdumpfile sees the file */

struct dd_layout {
	int ptr64;
	size_t off_block, off_subhdr, off_bitmap, off_maxmapnr;
	size_t subhdr_len;
	size_t off_split, off_vmci, off_vmci_sz, vmci_sz_64;
	size_t off_note, off_note_sz;
	size_t off_mapnr64;
};

static const struct dd_layout dd_layouts[2] = {
	/* 32-bit: packed, _pad1[2], 8-byte timeval */
	{ 0, 416, 420, 424, 428, 80, 8, 20, 28, 0, 32, 40, 72 },
	/* 64-bit: _pad1[6], 16-byte timeval */
	{ 1, 428, 432, 436, 440, 104, 12, 32, 40, 1, 48, 56, 96 },
};

static int popcount_region(int fd, uint64_t off, uint64_t len, uint64_t *count,
			   struct kh_error *err)
{
	uint8_t *buf = malloc(KH_STREAM_CHUNK);
	uint64_t n = 0;
	int ret = KH_OK;
	if (!buf)
		return nomem(err);
	while (len) {
		size_t chunk = (size_t)min_u64(len, KH_STREAM_CHUNK), i = 0;
		ret = pread_full(fd, buf, chunk, off, err);
		if (ret)
			break;
		for (; i + 8 <= chunk; i += 8) {
			uint64_t v;
			memcpy(&v, buf + i, 8);
			n += (uint64_t)__builtin_popcountll(v);
		}
		for (; i < chunk; ++i)
			n += (uint64_t)__builtin_popcount(buf[i]);
		off += chunk;
		len -= chunk;
	}
	free(buf);
	*count = n;
	return ret;
}

static int check_page_descs(int fd, uint64_t size, uint64_t desc_off,
			    uint64_t ndesc, uint32_t block, int be,
			    struct kh_error *err)
{
	const size_t per = KH_STREAM_CHUNK / DD_PAGE_DESC_SIZE;
	uint8_t *buf = malloc(per * DD_PAGE_DESC_SIZE);
	uint64_t i = 0;
	int ret = KH_OK;
	if (!buf)
		return nomem(err);
	while (i < ndesc && !ret) {
		size_t n = (size_t)min_u64(ndesc - i, per), k;
		ret = pread_full(fd, buf, n * DD_PAGE_DESC_SIZE,
				 desc_off + i * DD_PAGE_DESC_SIZE, err);
		for (k = 0; k < n && !ret; ++k, ++i) {
			const uint8_t *p = buf + k * DD_PAGE_DESC_SIZE;
			uint64_t off = rd64(p, be);
			uint32_t sz = rd32(p + 8, be), flags = rd32(p + 12, be);
			if (!in_file(off, sz, size))
				ret = seterr(err, KH_ERR_FORMAT,
					     "page descriptor %llu: data at %llu+%u "
					     "is past end of file (%llu bytes): "
					     "truncated dump?",
					     (unsigned long long)i,
					     (unsigned long long)off, sz,
					     (unsigned long long)size);
			else if ((flags & DD_COMPRESSED) ? sz > DD_MAX_BLOCK
							  : sz != block)
				ret = seterr(err, KH_ERR_FORMAT,
					     "page descriptor %llu: bad size %u "
					     "(flags %#x, block size %u)",
					     (unsigned long long)i, sz, flags, block);
		}
	}
	free(buf);
	return ret;
}

static int check_diskdump(int fd, uint64_t size, struct kh_error *err)
{
	uint8_t hdr[464], sub[104];
	const struct dd_layout *L = NULL;
	int be = 0, ret, li, bi;
	uint32_t block = 0, bitmap_blocks = 0;
	int32_t hv, sub_hdr_size;
	uint64_t max_pfn = 0, bitmap_off, bitmap_len, desc_off, bits;
	uint64_t dump_bm_off, dump_bm_len, ndesc = 0, desc_len;

	if (size < sizeof hdr)
		return seterr(err, KH_ERR_FORMAT,
			      "truncated kdump-compressed header (%llu bytes)",
			      (unsigned long long)size);
	ret = pread_full(fd, hdr, sizeof hdr, 0, err);
	if (ret)
		return ret;

	/* the same order libkdumpfile tries: 32-bit then 64-bit, LE then BE */
	for (li = 0; li < 2 && !L; ++li) {
		for (bi = 0; bi < 2; ++bi) {
			const struct dd_layout *l = &dd_layouts[li];
			uint32_t bs = rd32(hdr + l->off_block, bi);
			uint32_t bb = rd32(hdr + l->off_bitmap, bi);
			uint32_t mm = rd32(hdr + l->off_maxmapnr, bi);
			if (bs < DD_MIN_BLOCK || bs > DD_MAX_BLOCK)
				continue;
			if ((uint64_t)8 * bb * bs < mm)
				continue;
			L = l;
			be = bi;
			block = bs;
			bitmap_blocks = bb;
			max_pfn = mm;
			break;
		}
	}
	if (!L)
		return seterr(err, KH_ERR_FORMAT,
			      "kdump-compressed header has no plausible block "
			      "size and bitmap size");
	if (block & (block - 1))
		return seterr(err, KH_ERR_FORMAT,
			      "kdump-compressed block size %u is not a power of two",
			      block);
	hv = (int32_t)rd32(hdr + 8, be);
	sub_hdr_size = (int32_t)rd32(hdr + L->off_subhdr, be);
	if (hv < 0 || sub_hdr_size < 0)
		return seterr(err, KH_ERR_FORMAT,
			      "bad kdump-compressed header (version %d, "
			      "sub-header %d blocks)", hv, sub_hdr_size);

	if (hv >= 1) {
		if (!in_file(block, L->subhdr_len, size))
			return seterr(err, KH_ERR_FORMAT,
				      "truncated kdump-compressed sub-header");
		ret = pread_full(fd, sub, L->subhdr_len, block, err);
		if (ret)
			return ret;
		if (hv >= 2 && rd32(sub + L->off_split, be))
			return seterr(err, KH_ERR_UNSUPPORTED,
				      "one part of a makedumpfile --split dump; "
				      "reassemble the parts first");
		if (hv == 3) {
			uint64_t o = rd64(sub + L->off_vmci, be);
			uint64_t s = L->vmci_sz_64 ? rd64(sub + L->off_vmci_sz, be)
						   : rd32(sub + L->off_vmci_sz, be);
			if (!in_file(o, s, size))
				return seterr(err, KH_ERR_FORMAT,
					      "VMCOREINFO (%llu+%llu) is past end of "
					      "file", (unsigned long long)o,
					      (unsigned long long)s);
		}
		if (hv >= 4) {
			uint64_t o = rd64(sub + L->off_note, be);
			uint64_t s = L->ptr64 ? rd64(sub + L->off_note_sz, be)
					      : rd32(sub + L->off_note_sz, be);
			if (!in_file(o, s, size))
				return seterr(err, KH_ERR_FORMAT,
					      "ELF notes (%llu+%llu) are past end of "
					      "file", (unsigned long long)o,
					      (unsigned long long)s);
		}
		if (hv >= 6)
			max_pfn = rd64(sub + L->off_mapnr64, be);
	}

	if (!mul_ok(1 + (uint64_t)sub_hdr_size, block, &bitmap_off) ||
	    !mul_ok(bitmap_blocks, block, &bitmap_len) ||
	    !in_file(bitmap_off, bitmap_len, size))
		return seterr(err, KH_ERR_FORMAT,
			      "page bitmap (%u blocks after a %d-block sub-header)"
			      " extends past end of file (%llu bytes): truncated?",
			      bitmap_blocks, sub_hdr_size,
			      (unsigned long long)size);
	desc_off = bitmap_off + bitmap_len;
	bits = bitmap_len * 8;
	dump_bm_off = bitmap_off;
	dump_bm_len = bitmap_len;
	if (max_pfn <= bits / 2) {
		/* two bitmaps: RAM pages, then dumped pages */
		dump_bm_len = (uint64_t)(bitmap_blocks / 2) * block;
		dump_bm_off += dump_bm_len;
	}
	ret = popcount_region(fd, dump_bm_off, dump_bm_len, &ndesc, err);
	if (ret)
		return ret;
	if (!mul_ok(ndesc, DD_PAGE_DESC_SIZE, &desc_len) ||
	    !in_file(desc_off, desc_len, size))
		return seterr(err, KH_ERR_FORMAT,
			      "page descriptor table (%llu pages at offset %llu) "
			      "extends past end of file (%llu bytes): truncated?",
			      (unsigned long long)ndesc,
			      (unsigned long long)desc_off,
			      (unsigned long long)size);
	return check_page_descs(fd, size, desc_off, ndesc, block, be, err);
}

static int open_kdump(struct kh_dump *d, struct kh_error *err)
{
	kdump_status st;
	kdump_attr_t attr;
	kdump_num_t page_size = 0, max_pfn = 0;
	kdump_bmp_t *bmp;
	kdump_addr_t idx = 0;
	const char *desc = NULL;
	size_t cap = 0;
	int ret;

	ret = check_diskdump(d->fd, d->data_size, err);
	if (ret)
		return ret;
	d->kctx = kdump_new();
	if (!d->kctx)
		return nomem(err);
	if (pthread_mutex_init(&d->klock, NULL))
		return nomem(err);
	d->klock_ready = 1;
	/* read(2), never mmap(2): libkdumpfile's mmap path can copy past EOF */
	st = kdump_set_number_attr(d->kctx, KDUMP_ATTR_FILE_MMAP_POLICY,
				   KDUMP_MMAP_NEVER);
	if (st != KDUMP_OK)
		return kdump_error(err, d->kctx, st, "cannot set mmap policy");
	st = kdump_open_fd(d->kctx, d->fd);
	if (st != KDUMP_OK)
		return kdump_error(err, d->kctx, st, "cannot open dump");
	/*
	 * libkdumpfile searches its page cache linearly on every page; a sequential
	 * scan misses every time, so the default 1024 entries cost more than the
	 * reading. Each context holds one page at a time: a few per thread is
	 * plenty, and 2.5x faster here.
	 */
	st = kdump_set_number_attr(d->kctx, "cache.size", KH_KDUMP_CACHE_PAGES);
	if (st != KDUMP_OK)
		return kdump_error(err, d->kctx, st, "cannot size the page cache");
	st = kdump_get_number_attr(d->kctx, KDUMP_ATTR_PAGE_SIZE, &page_size);
	if (st != KDUMP_OK)
		return kdump_error(err, d->kctx, st, "no page size");
	st = kdump_get_number_attr(d->kctx, "max_pfn", &max_pfn);
	if (st != KDUMP_OK)
		return kdump_error(err, d->kctx, st, "no max_pfn");
	if (page_size < DD_MIN_BLOCK || page_size > DD_MAX_BLOCK ||
	    (page_size & (page_size - 1)))
		return seterr(err, KH_ERR_FORMAT, "bad page size %llu",
			      (unsigned long long)page_size);
	d->page_size = page_size;
	if (max_pfn > UINT64_MAX / page_size)
		max_pfn = UINT64_MAX / page_size;

	attr.type = KDUMP_BITMAP;
	st = kdump_get_typed_attr(d->kctx, KDUMP_ATTR_FILE_PAGEMAP, &attr);
	if (st != KDUMP_OK)
		return kdump_error(err, d->kctx, st, "no page map");
	bmp = attr.val.bitmap;
	kdump_bmp_incref(bmp);
	for (;;) {
		kdump_addr_t start, end;
		st = kdump_bmp_find_set(bmp, &idx);
		if (st != KDUMP_OK || idx >= max_pfn)
			break;
		start = idx;
		end = idx;
		kdump_bmp_find_clear(bmp, &end);
		if (end <= start || end > max_pfn)
			end = max_pfn;
		if (d->nsegs == cap) {
			size_t ncap = cap ? 2 * cap : 64;
			struct seg *ns;
			if (ncap > KH_MAX_SEGS) {
				kdump_bmp_decref(bmp);
				return seterr(err, KH_ERR_FORMAT,
					      "page map too fragmented");
			}
			ns = realloc(d->segs, ncap * sizeof *ns);
			if (!ns) {
				kdump_bmp_decref(bmp);
				return nomem(err);
			}
			d->segs = ns;
			cap = ncap;
		}
		d->segs[d->nsegs++] = (struct seg){
			.phys = start * page_size,
			.len = (end - start) * page_size,
			.kind = SEG_KDUMP,
		};
		if (end >= max_pfn)
			break;
		idx = end;
	}
	kdump_bmp_decref(bmp);
	ret = build_ranges(d, err);
	if (ret)
		return ret;
	if (kdump_get_string_attr(d->kctx, "file.description", &desc) != KDUMP_OK
	    || !desc)
		desc = "kdump";
	d->format = KH_FORMAT_KDUMP;
	snprintf(d->detail, sizeof d->detail, "%s%s (libkdumpfile %s), page size %llu",
		 d->flattened ? "flattened " : "", desc, KDUMPFILE_VERSION_STRING,
		 (unsigned long long)page_size);
	return KH_OK;
}

/* ------------------------------------------------------------------ */
/* flattened makedumpfile output */

static int open_tmpfile(const char *tmpdir, struct kh_error *err)
{
	const char *dir = tmpdir;
	char path[PATH_MAX];
	int fd;

	if (!dir || !*dir)
		dir = getenv("TMPDIR");
	if (!dir || !*dir)
		dir = "/tmp";
#ifdef O_TMPFILE
	fd = open(dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
	if (fd >= 0)
		return fd;
#endif
	if (snprintf(path, sizeof path, "%s/kdh-flat-XXXXXX", dir) >= (int)sizeof path)
		return -seterr(err, KH_ERR_INVALID, "temporary directory name too long");
	fd = mkostemp(path, O_CLOEXEC);
	if (fd < 0)
		return -seterr_os(err, errno, "cannot create a temporary file in %s", dir);
	unlink(path);
	return fd;
}

/*
 * A flattened file is a 4 KiB header, then (offset, size) big-endian record
 * headers each followed by `size` bytes to put at `offset`, then an end
 * marker of (-1, -1). Write the records into an unlinked temporary file.
 */
static int reassemble_flat(struct kh_dump *d, const char *tmpdir,
			   struct kh_error *err)
{
	const uint64_t size = d->data_size;
	const uint64_t limit = 2 * size + ((uint64_t)1 << 20);
	uint8_t *wbuf = NULL;
	uint64_t pos = MDF_HEADER_SIZE, wstart = 0, wlen = 0, max_end = 0;
	int out = -1, ret;

	if (size < MDF_HEADER_SIZE)
		return seterr(err, KH_ERR_FORMAT,
			      "truncated flattened header (%llu bytes)",
			      (unsigned long long)size);
	ret = map_data(d, err);
	if (ret)
		return ret;
	if (be64(d->map + 16) != MDF_TYPE_FLAT_HEADER ||
	    be64(d->map + 24) != MDF_VERSION_FLAT_HEADER)
		return seterr(err, KH_ERR_UNSUPPORTED,
			      "flattened dump of type %llu version %llu",
			      (unsigned long long)be64(d->map + 16),
			      (unsigned long long)be64(d->map + 24));
	out = open_tmpfile(tmpdir, err);
	if (out < 0)
		return -out;
	wbuf = malloc(MDF_WBUF_SIZE);
	if (!wbuf) {
		ret = nomem(err);
		goto fail;
	}
	for (;;) {
		uint64_t off, len;
		if (size - pos < 16) {
			ret = seterr(err, KH_ERR_FORMAT,
				     "flattened dump ends at %llu without its end "
				     "marker: truncated?", (unsigned long long)size);
			goto fail;
		}
		off = be64(d->map + pos);
		len = be64(d->map + pos + 8);
		if (off == UINT64_MAX && len == UINT64_MAX)
			break;
		if (off > INT64_MAX || len > INT64_MAX) {
			ret = seterr(err, KH_ERR_FORMAT,
				     "bad flattened record header at offset %llu",
				     (unsigned long long)pos);
			goto fail;
		}
		pos += 16;
		if (len > size - pos) {
			ret = seterr(err, KH_ERR_FORMAT,
				     "flattened record at offset %llu (%llu bytes) "
				     "extends past end of file: truncated?",
				     (unsigned long long)(pos - 16),
				     (unsigned long long)len);
			goto fail;
		}
		if (off > limit || len > limit - off) {
			ret = seterr(err, KH_ERR_FORMAT,
				     "flattened record at offset %llu writes to "
				     "%llu, far beyond the file size",
				     (unsigned long long)(pos - 16),
				     (unsigned long long)off);
			goto fail;
		}
		if (len) {
			if (wlen && off == wstart + wlen && len <= MDF_WBUF_SIZE - wlen) {
				memcpy(wbuf + wlen, d->map + pos, len);
				wlen += len;
			} else {
				if (wlen && (ret = pwrite_full(out, wbuf, wlen, wstart, err)))
					goto fail;
				wlen = 0;
				if (len >= MDF_WBUF_SIZE) {
					if ((ret = pwrite_full(out, d->map + pos, len, off, err)))
						goto fail;
				} else {
					memcpy(wbuf, d->map + pos, len);
					wstart = off;
					wlen = len;
				}
			}
			if (off + len > max_end)
				max_end = off + len;
		}
		pos += len;
	}
	if (wlen && (ret = pwrite_full(out, wbuf, wlen, wstart, err)))
		goto fail;
	if (ftruncate(out, (off_t)max_end)) {
		ret = seterr_os(err, errno, "cannot size reassembled dump");
		goto fail;
	}
	free(wbuf);
	munmap((void *)d->map, d->map_len);
	d->map = NULL;
	d->map_len = 0;
	close(d->fd);
	d->fd = out;
	d->data_size = max_end;
	d->flattened = 1;
	return KH_OK;
fail:
	free(wbuf);
	if (out >= 0)
		close(out);
	return ret;
}

/* ------------------------------------------------------------------ */
/* open / close */

enum sniffed { SNIFF_UNKNOWN, SNIFF_ELF, SNIFF_KDUMP, SNIFF_FLAT };

static enum sniffed sniff(const uint8_t *h, size_t n)
{
	if (n >= 4 && !memcmp(h, ELFMAG, SELFMAG))
		return SNIFF_ELF;
	if (n >= 8 && (!memcmp(h, "KDUMP   ", 8) || !memcmp(h, "DISKDUMP", 8)))
		return SNIFF_KDUMP;
	if (n >= 16 && !memcmp(h, MDF_SIGNATURE "\0\0\0\0", 16))
		return SNIFF_FLAT;
	return SNIFF_UNKNOWN;
}

static int open_detected(struct kh_dump *d, const struct kh_open_opts *opts,
			 int depth, struct kh_error *err)
{
	uint8_t h[16] = { 0 };
	size_t n = (size_t)min_u64(d->data_size, sizeof h);
	int ret;

	if (d->data_size == 0)
		return seterr(err, KH_ERR_FORMAT,
			      depth ? "flattened dump holds no data"
				    : "empty file (0 bytes)");
	ret = pread_full(d->fd, h, n, 0, err);
	if (ret)
		return ret;
	switch (sniff(h, n)) {
	case SNIFF_ELF:
		return open_elf(d, err);
	case SNIFF_KDUMP:
		return open_kdump(d, err);
	case SNIFF_FLAT:
		if (depth)
			break;
		ret = reassemble_flat(d, opts ? opts->tmpdir : NULL, err);
		if (ret)
			return ret;
		return open_detected(d, opts, depth + 1, err);
	default:
		break;
	}
	if (depth)
		return seterr(err, KH_ERR_FORMAT,
			      "flattened dump holds neither ELF nor "
			      "kdump-compressed data");
	if (n < 4)
		return seterr(err, KH_ERR_FORMAT,
			      "file too short (%zu bytes) to be a dump", n);
	return seterr(err, KH_ERR_FORMAT,
		      "not a dump: unrecognised format (first bytes "
		      "%02x %02x %02x %02x %02x %02x %02x %02x)",
		      h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]);
}

void kh_close(kh_dump *d)
{
	if (!d)
		return;
	if (d->kctx)
		kdump_free(d->kctx);
	if (d->klock_ready)
		pthread_mutex_destroy(&d->klock);
	if (d->map)
		munmap((void *)d->map, d->map_len);
	if (d->fd >= 0)
		close(d->fd);
	free(d->segs);
	free(d->ranges);
	free(d);
}

/* Takes ownership of fd. */
static int open_owned_fd(int fd, const struct kh_open_opts *opts,
			 kh_dump **out, struct kh_error *err)
{
	struct kh_dump *d;
	struct stat st;
	int ret;

	*out = NULL;
	if (fstat(fd, &st)) {
		ret = seterr_os(err, errno, "cannot stat the dump");
		close(fd);
		return ret;
	}
	if (!S_ISREG(st.st_mode)) {
		close(fd);
		return seterr(err, KH_ERR_UNSUPPORTED, "not a regular file");
	}
	d = calloc(1, sizeof *d);
	if (!d) {
		close(fd);
		return nomem(err);
	}
	d->fd = fd;
	d->file_size = d->data_size = (uint64_t)st.st_size;
	if (opts && opts->raw)
		ret = open_raw(d, opts->raw, opts->nraw, err);
	else
		ret = open_detected(d, opts, 0, err);
	if (ret) {
		kh_close(d);
		return ret;
	}
	/* a kdump dump reads through libkdumpfile; the mapping is not needed */
	if (d->format == KH_FORMAT_KDUMP && d->map) {
		munmap((void *)d->map, d->map_len);
		d->map = NULL;
		d->map_len = 0;
	}
	*out = d;
	return KH_OK;
}

int kh_open(const char *path, const struct kh_open_opts *opts,
	    kh_dump **out, struct kh_error *err)
{
	int fd;
	if (!path || !out)
		return seterr(err, KH_ERR_INVALID, "no path");
	*out = NULL;
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return seterr_os(err, errno, "cannot open");
	return open_owned_fd(fd, opts, out, err);
}

int kh_open_fd(int fd, const struct kh_open_opts *opts,
	       kh_dump **out, struct kh_error *err)
{
	int dup_fd;
	if (!out)
		return seterr(err, KH_ERR_INVALID, "no output pointer");
	*out = NULL;
	dup_fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
	if (dup_fd < 0)
		return seterr_os(err, errno, "cannot duplicate descriptor %d", fd);
	return open_owned_fd(dup_fd, opts, out, err);
}

int kh_dump_format(const kh_dump *d) { return d->format; }
int kh_dump_flattened(const kh_dump *d) { return d->flattened; }
const char *kh_dump_format_detail(const kh_dump *d) { return d->detail; }
uint64_t kh_dump_file_size(const kh_dump *d) { return d->file_size; }
size_t kh_dump_nranges(const kh_dump *d) { return d->nranges; }
const struct kh_range *kh_dump_ranges(const kh_dump *d) { return d->ranges; }
uint64_t kh_dump_total_bytes(const kh_dump *d) { return d->total_bytes; }
uint64_t kh_dump_duplicate_bytes(const kh_dump *d) { return d->duplicate_bytes; }

/* ------------------------------------------------------------------ */
/* reading */

static int read_kdump_locked(struct kh_dump *d, kdump_ctx_t *ctx, uint64_t phys,
			     void *buf, size_t len, struct kh_error *err)
{
	size_t got = len;
	kdump_status st = kdump_read(ctx, KDUMP_MACHPHYSADDR, phys, buf, &got);
	(void)d;
	if (st != KDUMP_OK) {
		char msg[KH_ERRMSG_MAX];
		copy_oneline(msg, sizeof msg, kdump_get_err(ctx));
		return seterr(err, KH_ERR_READ,
			      "cannot read physical %#llx: libkdumpfile: %s",
			      (unsigned long long)(phys + got), msg);
	}
	return KH_OK;
}

/*
 * Check that all of [phys, phys+len) is in the dump before any of it is read:
 * a request that is partly outside the dump is KH_ERR_NOT_PRESENT whatever
 * the pages inside it hold, never KH_ERR_READ because a kdump page before
 * the gap happens to be corrupt (and no page is decompressed for a read that
 * is bound to fail). The caller has checked that phys+len does not wrap.
 */
static int check_present(const struct kh_dump *d, uint64_t phys, size_t len,
			 struct kh_error *err)
{
	uint64_t end = phys + len, cur = phys;
	size_t i = find_seg(d, phys);

	while (cur < end) {
		if (i >= d->nsegs || cur < d->segs[i].phys ||
		    cur - d->segs[i].phys >= d->segs[i].len)
			return seterr(err, KH_ERR_NOT_PRESENT,
				      "physical %#llx-%#llx is not in the dump "
				      "(first missing byte %#llx)",
				      (unsigned long long)phys,
				      (unsigned long long)(end - 1),
				      (unsigned long long)cur);
		cur += min_u64(end - cur, d->segs[i].len - (cur - d->segs[i].phys));
		++i;
	}
	return KH_OK;
}

/* Read [phys, phys+len), KH_ERR_NOT_PRESENT unless all of it is in the dump;
 * ctx for kdump (or NULL to use the dump's own context under its lock). */
static int read_present(struct kh_dump *d, kdump_ctx_t *ctx, uint64_t phys,
			uint8_t *buf, size_t len, struct kh_error *err)
{
	uint64_t end = phys + len, cur = phys;
	size_t i = find_seg(d, phys);
	int ret = check_present(d, phys, len, err);

	if (ret)
		return ret;
	while (cur < end) {
		const struct seg *s;
		uint64_t n, off;
		/* check_present() saw segs[i] hold cur; keep the bounds anyway */
		if (i >= d->nsegs || cur < d->segs[i].phys ||
		    cur - d->segs[i].phys >= d->segs[i].len)
			return seterr(err, KH_ERR_NOT_PRESENT,
				      "physical %#llx is not in the dump",
				      (unsigned long long)cur);
		s = &d->segs[i];
		off = cur - s->phys;
		n = min_u64(end - cur, s->len - off);
		switch (s->kind) {
		case SEG_FILE:
			memcpy(buf + (cur - phys), d->map + s->file_off + off, n);
			break;
		case SEG_ZERO:
			memset(buf + (cur - phys), 0, n);
			break;
		case SEG_KDUMP:
			if (ctx) {
				ret = read_kdump_locked(d, ctx, cur, buf + (cur - phys), n, err);
			} else {
				pthread_mutex_lock(&d->klock);
				ret = read_kdump_locked(d, d->kctx, cur,
							buf + (cur - phys), n, err);
				pthread_mutex_unlock(&d->klock);
			}
			if (ret)
				return ret;
			break;
		}
		cur += n;
		++i;
	}
	return KH_OK;
}

int kh_read_phys(kh_dump *d, uint64_t phys, void *buf, size_t len,
		 struct kh_error *err)
{
	uint64_t end;
	if (!d || (!buf && len))
		return seterr(err, KH_ERR_INVALID, "no dump or buffer");
	if (len == 0)
		return KH_OK;
	if (len > KH_MAX_READ)
		return seterr(err, KH_ERR_INVALID, "read of %zu bytes is too large", len);
	if (!add_ok(phys, len, &end))
		return seterr(err, KH_ERR_INVALID,
			      "physical %#llx+%zu wraps around",
			      (unsigned long long)phys, len);
	return read_present(d, NULL, phys, buf, len, err);
}

/* ------------------------------------------------------------------ */
/* scanning */

struct hitvec {
	struct kh_hit *v;
	size_t n, cap;
};

struct rangevec {
	struct kh_range *v;
	size_t n, cap;
};

struct worker {
	struct kh_dump *d;
	const struct kh_scan_opts *opts;
	find_fn find;
	const uint64_t *cum;	/* scan-space start of each segment */
	uint64_t lo, hi;	/* this worker's share of scan space */

	struct hitvec hits;
	uint64_t n_valid, n_stale, n_torn;
	uint64_t listed_valid, listed_stale, listed_torn;
	struct rangevec unreadable;
	uint64_t unreadable_bytes;
	char unreadable_msg[KH_ERRMSG_MAX];
	uint64_t bytes;

	kdump_ctx_t *kctx;
	uint8_t *buf;
	int status;
	struct kh_error err;
};

static bool hit_push(struct worker *w, const struct kh_hit *h)
{
	if (w->hits.n == w->hits.cap) {
		size_t ncap = w->hits.cap ? 2 * w->hits.cap : 256;
		struct kh_hit *nv = realloc(w->hits.v, ncap * sizeof *nv);
		if (!nv) {
			w->status = nomem(&w->err);
			return false;
		}
		w->hits.v = nv;
		w->hits.cap = ncap;
	}
	w->hits.v[w->hits.n++] = *h;
	return true;
}

static void handle_record(struct worker *w, const uint8_t *rec, uint64_t phys)
{
	const struct kh_scan_opts *o = w->opts;
	struct kh_hit h;

	h.phys = phys;
	h.nonce = kh_le64(rec + KH_OFF_NONCE);
	h.version = kh_le16(rec + KH_OFF_VERSION);
	h.source = kh_le16(rec + KH_OFF_SOURCE);
	h.slot = kh_le32(rec + KH_OFF_SLOT);
	h.seq = kh_le64(rec + KH_OFF_SEQ);
	h.iova = kh_le64(rec + KH_OFF_IOVA);
	h.t_ns = kh_le64(rec + KH_OFF_T_NS);
	h.crc_stored = kh_le32(rec + KH_OFF_CRC);
	h.crc_computed = (uint32_t)crc32(0L, rec, KH_OFF_CRC);
	h.flags = kh_reserved_is_zero(rec) ? 0 : KH_HIT_F_RESERVED_NONZERO;

	if (h.crc_stored != h.crc_computed) {
		h.kind = KH_HIT_TORN;
		++w->n_torn;
		if (w->listed_torn < o->max_torn && hit_push(w, &h))
			++w->listed_torn;
	} else if (o->match_nonce && h.nonce != o->nonce) {
		h.kind = KH_HIT_STALE;
		++w->n_stale;
		if (w->listed_stale < o->max_stale && hit_push(w, &h))
			++w->listed_stale;
	} else {
		h.kind = KH_HIT_VALID;
		++w->n_valid;
		if (w->listed_valid < o->max_valid && hit_push(w, &h))
			++w->listed_valid;
	}
}

/* buf[0 .. npos+63) is readable; records may start at [0, npos). */
static void scan_block(struct worker *w, const uint8_t *buf, size_t npos,
		       uint64_t phys)
{
	size_t p = 0;
	while ((p = w->find(buf, p, npos)) < npos) {
		handle_record(w, buf + p, phys + p);
		++p;
	}
}

static void add_unreadable(struct worker *w, uint64_t phys, uint64_t len,
			   const char *why)
{
	struct rangevec *u = &w->unreadable;
	w->unreadable_bytes += len;
	if (!w->unreadable_msg[0])
		copy_oneline(w->unreadable_msg, sizeof w->unreadable_msg, why);
	if (u->n && u->v[u->n - 1].phys + u->v[u->n - 1].length == phys) {
		u->v[u->n - 1].length += len;
		return;
	}
	if (u->n == u->cap) {
		size_t ncap = u->cap ? 2 * u->cap : 16;
		struct kh_range *nv = realloc(u->v, ncap * sizeof *nv);
		if (!nv) {
			w->status = nomem(&w->err);
			return;
		}
		u->v = nv;
		u->cap = ncap;
	}
	u->v[u->n++] = (struct kh_range){ phys, len };
}

/* Scan record starts in [a, b) of a mapped segment. */
static void scan_file_piece(struct worker *w, const struct seg *s,
			    uint64_t a, uint64_t b)
{
	uint64_t avail = min_u64(s->len, b + (KH_RECORD_SIZE - 1)) - a;
	uint64_t npos;
	if (avail < KH_RECORD_SIZE)
		return;
	npos = min_u64(b - a, avail - (KH_RECORD_SIZE - 1));
	scan_block(w, w->d->map + s->file_off + a, (size_t)npos, s->phys + a);
}

/* Scan record starts in [a, b) of a libkdumpfile segment, streaming. */
static void scan_kdump_piece(struct worker *w, const struct seg *s,
			     uint64_t a, uint64_t b)
{
	const uint64_t ps = w->d->page_size;
	const uint64_t stop = s->phys + min_u64(s->len, b + (KH_RECORD_SIZE - 1));
	const uint64_t accept_end = s->phys + b;
	uint64_t pos = s->phys + a, bufphys = pos;
	size_t carry = 0;

	while (pos < stop && !w->status) {
		size_t want = (size_t)min_u64(KH_STREAM_CHUNK, stop - pos);
		size_t got = want, blen, keep;
		uint64_t npos = 0;
		kdump_status st = kdump_read(w->kctx, KDUMP_MACHPHYSADDR, pos,
					     w->buf + carry, &got);
		if (got > want)
			got = 0;	/* never trust it past what we asked */
		blen = carry + got;
		if (blen >= KH_RECORD_SIZE)
			npos = blen - (KH_RECORD_SIZE - 1);
		if (bufphys + npos > accept_end)
			npos = accept_end > bufphys ? accept_end - bufphys : 0;
		scan_block(w, w->buf, (size_t)npos, bufphys);
		if (st != KDUMP_OK) {
			uint64_t bad = pos + got;
			uint64_t next = (bad & ~(ps - 1)) + ps;
			if (next > stop || next <= bad)
				next = stop;
			/* report only what lies in this worker's share */
			if (bad < accept_end)
				add_unreadable(w, bad, min_u64(next, accept_end) - bad,
					       kdump_get_err(w->kctx));
			pos = bufphys = next;
			carry = 0;
			continue;
		}
		pos += got;
		keep = blen < KH_RECORD_SIZE - 1 ? blen : KH_RECORD_SIZE - 1;
		memmove(w->buf, w->buf + blen - keep, keep);
		bufphys += blen - keep;
		carry = keep;
	}
}

static void *worker_run(void *arg)
{
	struct worker *w = arg;
	const struct kh_dump *d = w->d;
	size_t i;

	for (i = 0; i < d->nsegs && !w->status; ++i) {
		const struct seg *s = &d->segs[i];
		uint64_t c = w->cum[i], a, b;
		if (s->kind == SEG_ZERO || c + s->len <= w->lo)
			continue;
		if (c >= w->hi)
			break;
		a = (w->lo > c ? w->lo : c) - c;
		b = min_u64(w->hi, c + s->len) - c;
		w->bytes += b - a;
		if (s->kind == SEG_FILE)
			scan_file_piece(w, s, a, b);
		else
			scan_kdump_piece(w, s, a, b);
	}
	return NULL;
}

/*
 * Records crossing from one segment into the next physically contiguous one
 * (ELF PT_LOADs that abut, a PT_LOAD running into its zero-fill, pieces left
 * over by dedupe): for each seam S, records starting in the segment before it
 * and ending after it. A record crossing several seams is counted at the
 * first one only, since its start lies in the segment just before that seam.
 */
static void scan_seams(struct worker *w)
{
	struct kh_dump *d = w->d;
	uint8_t win[2 * KH_RECORD_SIZE];
	size_t i, j = 0;
	uint64_t run_end = 0;

	for (i = 0; i + 1 < d->nsegs && !w->status; ++i) {
		const struct seg *s = &d->segs[i];
		uint64_t S = s->phys + s->len, ws, we, npos;
		struct kh_error e;
		if (d->segs[i + 1].phys != S)
			continue;
		if (j <= i) {	/* end of the contiguous run holding seam i */
			j = i + 1;
			while (j + 1 < d->nsegs &&
			       d->segs[j].phys + d->segs[j].len == d->segs[j + 1].phys)
				++j;
			run_end = d->segs[j].phys + d->segs[j].len;
		}
		ws = S - min_u64(s->len, KH_RECORD_SIZE - 1);
		we = S + min_u64(run_end - S, KH_RECORD_SIZE - 1);
		if (we - ws < KH_RECORD_SIZE)
			continue;
		if (read_present(d, w->kctx, ws, win, (size_t)(we - ws), &e))
			continue;	/* unreadable pages are reported by the workers */
		npos = min_u64(S - ws, (we - ws) - (KH_RECORD_SIZE - 1));
		/* find needs npos+63 readable bytes: it has exactly that */
		scan_block(w, win, (size_t)npos, ws);
	}
}

static int hit_cmp(const void *a, const void *b)
{
	const struct kh_hit *x = a, *y = b;
	if (x->phys != y->phys)
		return x->phys < y->phys ? -1 : 1;
	return 0;
}

static int range_cmp(const void *a, const void *b)
{
	const struct kh_range *x = a, *y = b;
	if (x->phys != y->phys)
		return x->phys < y->phys ? -1 : 1;
	return 0;
}

void kh_scan_result_free(struct kh_scan_result *r)
{
	if (!r)
		return;
	free(r->hits);
	free(r->unreadable);
	free(r);
}

static unsigned choose_threads(const struct kh_scan_opts *o, uint64_t bytes)
{
	long ncpu;
	unsigned n = o->nthreads;
	if (!n) {
		ncpu = sysconf(_SC_NPROCESSORS_ONLN);
		n = ncpu > 0 ? (unsigned)ncpu : 1;
	}
	if (n > KH_MAX_THREADS)
		n = KH_MAX_THREADS;
	if (!o->nthreads && bytes / KH_MIN_BYTES_PER_THREAD < n)
		n = (unsigned)(bytes / KH_MIN_BYTES_PER_THREAD);
	return n ? n : 1;
}

int kh_scan(kh_dump *d, const struct kh_scan_opts *opts,
	    struct kh_scan_result **out, struct kh_error *err)
{
	struct worker *ws = NULL;
	pthread_t *tids = NULL;
	bool *started = NULL;
	uint64_t *cum = NULL, total = 0;
	struct kh_scan_result *r = NULL;
	unsigned nt, t;
	size_t i, nh = 0, nu = 0;
	find_fn find = pick_find();
	int ret = KH_OK;

	if (!d || !opts || !out)
		return seterr(err, KH_ERR_INVALID, "missing argument");
	*out = NULL;
	cum = malloc((d->nsegs + 1) * sizeof *cum);
	if (!cum)
		return nomem(err);
	for (i = 0; i < d->nsegs; ++i) {
		cum[i] = total;
		if (d->segs[i].kind != SEG_ZERO)
			total += d->segs[i].len;
	}
	cum[d->nsegs] = total;

	nt = choose_threads(opts, total);
	/* workers[nt] does the seams */
	ws = calloc(nt + 1, sizeof *ws);
	tids = calloc(nt, sizeof *tids);
	started = calloc(nt, sizeof *started);
	r = calloc(1, sizeof *r);
	if (!ws || !tids || !started || !r) {
		ret = nomem(err);
		goto out;
	}
	for (t = 0; t <= nt; ++t) {
		struct worker *w = &ws[t];
		w->d = d;
		w->opts = opts;
		w->find = find;
		w->cum = cum;
		w->lo = (uint64_t)((unsigned __int128)total * t / nt);
		w->hi = (uint64_t)((unsigned __int128)total * (t + 1) / nt);
		if (d->kctx) {
			w->kctx = kdump_clone(d->kctx, 0);
			w->buf = malloc(KH_STREAM_CHUNK + KH_RECORD_SIZE);
			if (!w->kctx || !w->buf) {
				ret = nomem(err);
				goto out;
			}
		}
	}
	for (t = 1; t < nt; ++t)
		started[t] = pthread_create(&tids[t], NULL, worker_run, &ws[t]) == 0;
	worker_run(&ws[0]);
	for (t = 1; t < nt; ++t) {
		if (started[t])
			pthread_join(tids[t], NULL);
		else
			worker_run(&ws[t]);
	}
	scan_seams(&ws[nt]);

	for (t = 0; t <= nt; ++t) {
		if (ws[t].status) {
			ret = seterr(err, ws[t].status, "%s", ws[t].err.msg);
			goto out;
		}
		nh += ws[t].hits.n;
		nu += ws[t].unreadable.n;
		r->n_valid += ws[t].n_valid;
		r->n_stale += ws[t].n_stale;
		r->n_torn += ws[t].n_torn;
		r->bytes_scanned += ws[t].bytes;
		r->unreadable_bytes += ws[t].unreadable_bytes;
		if (!r->unreadable_msg[0] && ws[t].unreadable_msg[0])
			memcpy(r->unreadable_msg, ws[t].unreadable_msg,
			       sizeof r->unreadable_msg);
	}
	r->nthreads = nt;
	r->bytes_scanned -= r->unreadable_bytes;
	/* zero-fill segments count as scanned: they hold no records */
	for (i = 0; i < d->nsegs; ++i)
		if (d->segs[i].kind == SEG_ZERO)
			r->bytes_scanned += d->segs[i].len;

	if (nh) {
		uint64_t kept[3] = { 0, 0, 0 };
		const uint64_t bound[3] = { opts->max_valid, opts->max_stale,
					    opts->max_torn };
		size_t k = 0;
		r->hits = malloc(nh * sizeof *r->hits);
		if (!r->hits) {
			ret = nomem(err);
			goto out;
		}
		for (t = 0; t <= nt; ++t) {
			if (ws[t].hits.n)
				memcpy(r->hits + k, ws[t].hits.v,
				       ws[t].hits.n * sizeof *r->hits);
			k += ws[t].hits.n;
		}
		qsort(r->hits, nh, sizeof *r->hits, hit_cmp);
		/* keep the lowest addresses of each kind, whatever the split */
		for (i = 0, k = 0; i < nh; ++i) {
			uint32_t kind = r->hits[i].kind;
			if (kind < 3 && kept[kind] < bound[kind]) {
				++kept[kind];
				r->hits[k++] = r->hits[i];
			}
		}
		r->nhits = k;
	}
	if (nu) {
		size_t k = 0, n = 0;
		struct kh_range *u = malloc(nu * sizeof *u);
		if (!u) {
			ret = nomem(err);
			goto out;
		}
		for (t = 0; t <= nt; ++t) {
			if (ws[t].unreadable.n)
				memcpy(u + k, ws[t].unreadable.v,
				       ws[t].unreadable.n * sizeof *u);
			k += ws[t].unreadable.n;
		}
		qsort(u, nu, sizeof *u, range_cmp);
		for (i = 0; i < nu; ++i) {
			if (n && u[n - 1].phys + u[n - 1].length == u[i].phys)
				u[n - 1].length += u[i].length;
			else
				u[n++] = u[i];
		}
		r->n_unreadable = n;
		r->unreadable_listed = (size_t)min_u64(n, opts->max_unreadable);
		r->unreadable = u;
	}
	*out = r;
	r = NULL;
out:
	if (ws) {
		for (t = 0; t <= nt; ++t) {
			free(ws[t].hits.v);
			free(ws[t].unreadable.v);
			free(ws[t].buf);
			if (ws[t].kctx)
				kdump_free(ws[t].kctx);
		}
	}
	kh_scan_result_free(r);
	free(ws);
	free(tids);
	free(started);
	free(cum);
	return ret;
}

/* ------------------------------------------------------------------ */
/* benchmark baseline */

int kh_bench_memmem(const char *path, const void *needle, size_t nlen,
		    uint64_t *count, struct kh_error *err)
{
	struct stat st;
	const uint8_t *m, *p, *end;
	uint64_t n = 0;
	int fd = open(path, O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		return seterr_os(err, errno, "cannot open");
	if (fstat(fd, &st) || st.st_size <= 0) {
		close(fd);
		return seterr(err, KH_ERR_INVALID, "empty or unreadable file");
	}
	m = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
	close(fd);
	if (m == MAP_FAILED)
		return seterr_os(err, errno, "cannot mmap %s", path);
	end = m + st.st_size;
	for (p = m; (p = memmem(p, (size_t)(end - p), needle, nlen)); ++p)
		++n;
	munmap((void *)m, (size_t)st.st_size);
	*count = n;
	return KH_OK;
}
