/*
 * khdma: the first kernel's side of kdump-harness's DMA sources. Static, no
 * dependencies beyond libc and the kernel's UAPI headers.
 *
 *   khdma canary NONCE COUNT
 *       Allocate COUNT pages, fill each with canary marker records (see
 *       docs/markers.md), print "canary index=I phys=0xP" for each, then hold
 *       them (locked) until killed.
 *
 *   khdma edu-raw BDF NONCE NEXT_KERNEL_BASE [CANARIES]
 *       For a plain kexec handover (see cmd_edu_raw): no driver, no IOMMU mapping.
 *
 *   khdma edu BDF NONCE CRASH_START CRASH_END [CANARIES]
 *       Canary pages as above, then bind the edu device at BDF to vfio-pci,
 *       enable bus mastering and map DMA targets through VFIO type1:
 *         - a staging page at IOVA == its own physical address (the host
 *           writes marker records there and makes edu read them);
 *         - "buffer" pages the device may write, each mapped at an IOVA equal
 *           to the physical address of a canary page, so a crash kernel that
 *           drops translation sends those writes onto the canary;
 *         - unmapped IOVAs on purpose: inside the crash kernel's reservation,
 *           and equal to the physical address of another canary page.
 *       One page per target and moment of the host's schedule (slot 0..3).
 *       Without an IOMMU (no iommu_group) it uses physical addresses directly
 *       and maps nothing. Prints one line per fact (see below), then holds
 *       everything until killed.
 *
 * Output lines (read by the host from the results port):
 *   canary index=I phys=0xP
 *   edu-staging iova=0xI phys=0xP
 *   edu-target group=G slot=S iova=0xI phys=0xP mapped=1 kind=buffer canary=J
 *   edu-target group=crash slot=S iova=0xI phys=0 mapped=0 kind=crash-region
 *   edu-target group=old slot=S iova=0xI phys=0 mapped=0 kind=old-memory canary=J
 *   edu-ready bdf=B bar0=0xA group=G iommu=1
 *   error what=... errno=...
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <linux/vfio.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define PAGE 4096u
#define REC 64u
#define MAX_CANARIES 256

static void say(const char *fmt, ...)
{
	char line[512];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(line, sizeof(line) - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if (n > (int)sizeof(line) - 2)
		n = sizeof(line) - 2;
	line[n++] = '\n';
	/* one write per line: the port is shared with the init script */
	if (write(STDOUT_FILENO, line, n) < 0) {
		/* nothing sensible to do */
	}
}

static void die(const char *what)
{
	say("error what=%s errno=%d", what, errno);
	exit(1);
}

/* CRC-32 (IEEE, as zlib) */
static uint32_t crc32_ieee(const uint8_t *p, size_t n)
{
	uint32_t c = 0xFFFFFFFFu;

	while (n--) {
		c ^= *p++;
		for (int k = 0; k < 8; k++)
			c = (c >> 1) ^ (0xEDB88320u & -(c & 1u));
	}
	return ~c;
}

static void put64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = v >> (8 * i); }
static void put32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = v >> (8 * i); }
static void put16(uint8_t *p, uint16_t v) { p[0] = v; p[1] = v >> 8; }

/* The magic is assembled at run time so this binary's own bytes never match it. */
static void marker(uint8_t *r, uint64_t nonce, uint16_t source, uint32_t slot, uint64_t seq, uint64_t iova)
{
	static const char m[8] = { 'K' ^ 0x5a, 'D' ^ 0x5a, 'H' ^ 0x5a, '-' ^ 0x5a, 'M' ^ 0x5a, 'R' ^ 0x5a, 'K' ^ 0x5a, '1' ^ 0x5a };
	static volatile uint8_t key = 0x5a; /* volatile: the compiler must not fold the magic back in */

	memset(r, 0, REC);
	for (int i = 0; i < 8; i++)
		r[i] = m[i] ^ key;
	put64(r + 8, nonce);
	put16(r + 16, 1);
	put16(r + 18, source);
	put32(r + 20, slot);
	put64(r + 24, seq);
	put64(r + 32, iova);
	put64(r + 40, 0);
	put32(r + 60, crc32_ieee(r, 60));
}

static uint64_t phys_of(void *virt)
{
	static int fd = -1;
	uint64_t entry;
	off_t off = ((uintptr_t)virt / PAGE) * 8;

	if (fd < 0 && (fd = open("/proc/self/pagemap", O_RDONLY)) < 0)
		die("open-pagemap");
	if (pread(fd, &entry, 8, off) != 8)
		die("read-pagemap");
	if (!(entry >> 63) || !(entry & ((1ULL << 55) - 1))) {
		errno = EFAULT;
		die("page-not-present");
	}
	return (entry & ((1ULL << 55) - 1)) * PAGE;
}

static void *locked_pages(size_t n)
{
	void *p = mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE | MAP_LOCKED, -1, 0);

	if (p == MAP_FAILED)
		die("mmap");
	memset(p, 0, n * PAGE); /* really fault every page in */
	return p;
}

struct canaries {
	unsigned count;
	uint8_t *mem;
	uint64_t phys[MAX_CANARIES];
};

static void make_canaries(struct canaries *c, uint64_t nonce, unsigned count)
{
	if (count > MAX_CANARIES)
		count = MAX_CANARIES;
	c->count = count;
	if (!count)
		return;
	c->mem = locked_pages(count);
	for (unsigned i = 0; i < count; i++) {
		uint8_t *page = c->mem + (size_t)i * PAGE;

		c->phys[i] = phys_of(page);
		for (unsigned s = 0; s < PAGE / REC; s++)
			marker(page + s * REC, nonce, 3, s, i, c->phys[i] + s * REC);
		say("canary index=%u phys=0x%" PRIx64, i, c->phys[i]);
	}
}

static int write_file(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY);
	ssize_t n;

	if (fd < 0)
		return -1;
	n = write(fd, text, strlen(text));
	close(fd);
	return n < 0 ? -1 : 0;
}

static int group_of(const char *bdf)
{
	char path[PATH_MAX], link[PATH_MAX];
	ssize_t n;

	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/iommu_group", bdf);
	n = readlink(path, link, sizeof(link) - 1);
	if (n < 0)
		return -1;
	link[n] = 0;
	return atoi(strrchr(link, '/') + 1);
}

static uint64_t bar0_of(const char *bdf)
{
	char path[PATH_MAX];
	unsigned long long start = 0, end = 0, flags = 0;
	FILE *f;

	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/resource", bdf);
	f = fopen(path, "r");
	if (!f)
		die("open-resource");
	if (fscanf(f, "%llx %llx %llx", &start, &end, &flags) != 3)
		die("parse-resource");
	fclose(f);
	return start;
}

/*
 * Bind the device to vfio-pci and return its IOMMU group, or -1 when it has
 * none (no IOMMU). The group may only appear with the binding: with ACPI VIOT
 * (virtio-iommu) a device is put behind its IOMMU when a driver probes it.
 */
static int bind_vfio(const char *bdf)
{
	char path[PATH_MAX];
	struct stat st;
	int group;

	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/driver/unbind", bdf);
	write_file(path, bdf); /* fails harmlessly when no driver is bound */
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/driver_override", bdf);
	if (write_file(path, "vfio-pci"))
		die("driver-override");
	write_file("/sys/bus/pci/drivers_probe", bdf); /* fails without an IOMMU group */
	group = group_of(bdf);
	if (group < 0) {
		write_file(path, "\n");
		return -1;
	}
	snprintf(path, sizeof(path), "/dev/vfio/%d", group);
	for (int i = 0; i < 200 && stat(path, &st); i++)
		usleep(50000);
	if (stat(path, &st))
		die("no-vfio-group-node");
	return group;
}

static void vfio_map(int container, void *vaddr, uint64_t iova, uint64_t size)
{
	struct vfio_iommu_type1_dma_map map = {
		.argsz = sizeof(map),
		.flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
		.vaddr = (uintptr_t)vaddr,
		.iova = iova,
		.size = size,
	};

	if (ioctl(container, VFIO_IOMMU_MAP_DMA, &map))
		die("vfio-map-dma");
}

static void enable_bus_master_vfio(int device)
{
	struct vfio_region_info reg = { .argsz = sizeof(reg), .index = VFIO_PCI_CONFIG_REGION_INDEX };
	uint16_t cmd;

	if (ioctl(device, VFIO_DEVICE_GET_REGION_INFO, &reg))
		die("vfio-config-region");
	if (pread(device, &cmd, 2, reg.offset + 4) != 2)
		die("read-command");
	cmd |= 0x6; /* memory space, bus master */
	if (pwrite(device, &cmd, 2, reg.offset + 4) != 2)
		die("write-command");
}

static void enable_bus_master_config(const char *bdf)
{
	char path[PATH_MAX];
	uint16_t cmd;
	int fd;

	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/config", bdf);
	fd = open(path, O_RDWR);
	if (fd < 0)
		die("open-config");
	if (pread(fd, &cmd, 2, 4) != 2)
		die("read-command");
	cmd |= 0x6;
	if (pwrite(fd, &cmd, 2, 4) != 2)
		die("write-command");
	close(fd);
}

/*
 * Targets come in groups, one page per moment of the host's schedule (SLOTS:
 * before the panic, during kexec, crash kernel early, crash kernel userspace),
 * so a later transfer never hides an earlier one.
 */
#define SLOTS 4
#define NBUF 2

static int cmd_edu(const char *bdf, uint64_t nonce, uint64_t crash_start, uint64_t crash_end, unsigned ncanary)
{
	struct canaries c;
	int group;
	uint8_t *staging, *buffers;
	uint64_t staging_phys;

	if (ncanary < (NBUF + 1) * SLOTS)
		ncanary = (NBUF + 1) * SLOTS;
	make_canaries(&c, nonce, ncanary);
	staging = locked_pages(1);
	staging_phys = phys_of(staging);
	buffers = locked_pages(NBUF * SLOTS);

	group = bind_vfio(bdf);
	if (group >= 0) {
		char path[64];
		int container, grp, device;
		struct vfio_group_status status = { .argsz = sizeof(status) };

		container = open("/dev/vfio/vfio", O_RDWR);
		if (container < 0)
			die("open-container");
		if (ioctl(container, VFIO_GET_API_VERSION) != VFIO_API_VERSION)
			die("vfio-api-version");
		snprintf(path, sizeof(path), "/dev/vfio/%d", group);
		grp = open(path, O_RDWR);
		if (grp < 0)
			die("open-group");
		if (ioctl(grp, VFIO_GROUP_GET_STATUS, &status) || !(status.flags & VFIO_GROUP_FLAGS_VIABLE))
			die("group-not-viable");
		if (ioctl(grp, VFIO_GROUP_SET_CONTAINER, &container))
			die("set-container");
		if (ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU))
			die("set-iommu");
		device = ioctl(grp, VFIO_GROUP_GET_DEVICE_FD, bdf);
		if (device < 0)
			die("get-device-fd");
		enable_bus_master_vfio(device);

		vfio_map(container, staging, staging_phys, PAGE);
		say("edu-staging iova=0x%" PRIx64 " phys=0x%" PRIx64, staging_phys, staging_phys);
		for (unsigned b = 0; b < NBUF; b++) {
			for (unsigned slot = 0; slot < SLOTS; slot++) {
				unsigned ci = b * SLOTS + slot;
				uint8_t *page = buffers + (size_t)ci * PAGE;
				uint64_t iova = c.phys[ci];

				vfio_map(container, page, iova, PAGE);
				say("edu-target group=buffer%u slot=%u iova=0x%" PRIx64 " phys=0x%" PRIx64
				    " mapped=1 kind=buffer canary=%u", b, slot, iova, phys_of(page), ci);
			}
		}
		for (unsigned slot = 0; slot < SLOTS; slot++) {
			unsigned ci = NBUF * SLOTS + slot;

			/* 16 MiB into the reservation: memory the crash kernel owns */
			if (crash_end > crash_start + (32u << 20))
				say("edu-target group=crash slot=%u iova=0x%" PRIx64 " phys=0 mapped=0 kind=crash-region",
				    slot, crash_start + (16u << 20) + (uint64_t)slot * PAGE);
			say("edu-target group=old slot=%u iova=0x%" PRIx64 " phys=0 mapped=0 kind=old-memory canary=%u",
			    slot, c.phys[ci], ci);
		}
		/* fds stay open: the mappings live as long as this process */
	} else {
		enable_bus_master_config(bdf);
		say("edu-staging iova=0x%" PRIx64 " phys=0x%" PRIx64, staging_phys, staging_phys);
		for (unsigned b = 0; b < NBUF; b++) {
			for (unsigned slot = 0; slot < SLOTS; slot++) {
				uint64_t p = phys_of(buffers + (size_t)(b * SLOTS + slot) * PAGE);

				say("edu-target group=buffer%u slot=%u iova=0x%" PRIx64 " phys=0x%" PRIx64
				    " mapped=1 kind=buffer", b, slot, p, p);
			}
		}
	}
	say("edu-ready bdf=%s bar0=0x%" PRIx64 " group=%d iommu=%d", bdf, bar0_of(bdf), group, group >= 0);
	for (;;)
		pause();
	return 0;
}

/*
 * For a plain kexec handover: edu with no driver at all, memory decoding and
 * bus mastering switched on in its command register directly. Its PCI state
 * stays "unknown", so the kernel's kexec shutdown (which clears bus mastering of
 * devices a driver enabled) leaves it running into the next kernel. Device
 * addresses are physical (no IOMMU, or an identity domain, or translation
 * switched off at the handover).
 *   buffers: pages of this process, one per slot (valid before the handover);
 *   new-kernel: NEWK + 4 MiB + slot pages, inside where the next kernel's image
 *   will sit (it boots with nokaslr at CONFIG_PHYSICAL_START).
 */
static int cmd_edu_raw(const char *bdf, uint64_t nonce, uint64_t newk, unsigned ncanary)
{
	struct canaries c;
	uint8_t *staging, *buffers;
	uint64_t staging_phys;

	make_canaries(&c, nonce, ncanary);
	staging = locked_pages(1);
	staging_phys = phys_of(staging);
	buffers = locked_pages(SLOTS);
	enable_bus_master_config(bdf);
	say("edu-staging iova=0x%" PRIx64 " phys=0x%" PRIx64, staging_phys, staging_phys);
	for (unsigned slot = 0; slot < SLOTS; slot++) {
		uint64_t p = phys_of(buffers + (size_t)slot * PAGE);

		say("edu-target group=buffer0 slot=%u iova=0x%" PRIx64 " phys=0x%" PRIx64 " mapped=1 kind=buffer",
		    slot, p, p);
		if (slot > 0)
			say("edu-target group=newkernel slot=%u iova=0x%" PRIx64 " phys=0 mapped=0 kind=new-kernel",
			    slot, newk + (4u << 20) + (uint64_t)slot * PAGE);
	}
	say("edu-ready bdf=%s bar0=0x%" PRIx64 " group=-1 iommu=0", bdf, bar0_of(bdf));
	for (;;)
		pause();
	return 0;
}

static uint64_t num(const char *s)
{
	char *end;
	uint64_t v;

	errno = 0;
	v = strtoull(s, &end, 0);
	if (errno || *end) {
		fprintf(stderr, "khdma: not a number: %s\n", s);
		exit(2);
	}
	return v;
}

int main(int argc, char **argv)
{
	if (argc == 4 && !strcmp(argv[1], "canary")) {
		struct canaries c;

		make_canaries(&c, num(argv[2]), (unsigned)num(argv[3]));
		for (;;)
			pause();
	}
	if ((argc == 5 || argc == 6) && !strcmp(argv[1], "edu-raw"))
		return cmd_edu_raw(argv[2], num(argv[3]), num(argv[4]), argc == 6 ? (unsigned)num(argv[5]) : 16);
	if ((argc == 6 || argc == 7) && !strcmp(argv[1], "edu"))
		return cmd_edu(argv[2], num(argv[3]), num(argv[4]), num(argv[5]), argc == 7 ? (unsigned)num(argv[6]) : 8);
	fprintf(stderr, "usage: khdma canary NONCE COUNT\n"
			"       khdma edu BDF NONCE CRASH_START CRASH_END [CANARIES]\n"
			"       khdma edu-raw BDF NONCE NEXT_KERNEL_BASE [CANARIES]\n");
	return 2;
}
