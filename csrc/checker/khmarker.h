/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * khmarker.h - the 64-byte kdump-harness marker record, as C sees it.
 *
 * The reference is harness/markers.py and docs/markers.md; keep the three in
 * step. All integers are little-endian and records are not aligned, so this
 * header decodes them with byte loads instead of casting a struct pointer.
 *
 *   offset size  field
 *    0      8    magic    "KDH-MRK1"
 *    8      8    nonce
 *   16      2    version  1
 *   18      2    source   1 nic, 2 edu, 3 canary
 *   20      4    slot
 *   24      8    seq
 *   32      8    iova
 *   40      8    t_ns
 *   48     12    reserved (zero)
 *   60      4    crc32    zlib CRC-32 of bytes 0..59
 */
#ifndef KHMARKER_H
#define KHMARKER_H

#include <stdint.h>
#include <string.h>

#define KH_MAGIC		"KDH-MRK1"
#define KH_MAGIC_LEN		8
#define KH_RECORD_SIZE		64
#define KH_RECORD_VERSION	1

#define KH_OFF_MAGIC		0
#define KH_OFF_NONCE		8
#define KH_OFF_VERSION		16
#define KH_OFF_SOURCE		18
#define KH_OFF_SLOT		20
#define KH_OFF_SEQ		24
#define KH_OFF_IOVA		32
#define KH_OFF_T_NS		40
#define KH_OFF_RESERVED		48
#define KH_RESERVED_LEN		12
#define KH_OFF_CRC		60	/* also the number of bytes the CRC covers */

enum kh_source {
	KH_SOURCE_NIC = 1,
	KH_SOURCE_EDU = 2,
	KH_SOURCE_CANARY = 3,
};

/* The wire layout, for documentation and size checks only: never cast an
 * unaligned buffer to it. */
struct kh_marker_wire {
	char magic[8];
	uint64_t nonce;
	uint16_t version;
	uint16_t source;
	uint32_t slot;
	uint64_t seq;
	uint64_t iova;
	uint64_t t_ns;
	uint8_t reserved[KH_RESERVED_LEN];
	uint32_t crc32;
} __attribute__((packed));

_Static_assert(sizeof(struct kh_marker_wire) == KH_RECORD_SIZE,
	       "marker record must be 64 bytes");

static inline uint16_t kh_le16(const uint8_t *p)
{
	return (uint16_t)(p[0] | (uint16_t)p[1] << 8);
}

static inline uint32_t kh_le32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 |
	       (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline uint64_t kh_le64(const uint8_t *p)
{
	return (uint64_t)kh_le32(p) | (uint64_t)kh_le32(p + 4) << 32;
}

/* The magic as a little-endian 64-bit load of its 8 bytes. */
static inline uint64_t kh_magic_u64(void)
{
	return kh_le64((const uint8_t *)KH_MAGIC);
}

static inline int kh_is_magic(const uint8_t *p)
{
	return memcmp(p, KH_MAGIC, KH_MAGIC_LEN) == 0;
}

static inline int kh_reserved_is_zero(const uint8_t *rec)
{
	static const uint8_t zero[KH_RESERVED_LEN];
	return memcmp(rec + KH_OFF_RESERVED, zero, KH_RESERVED_LEN) == 0;
}

#endif /* KHMARKER_H */
