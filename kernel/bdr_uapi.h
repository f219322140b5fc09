/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * bdr_uapi.h - the ABI between the "bdr" device-mapper target and userspace.
 *
 * This header is the single source of truth for the ring layout, the record
 * format and the ioctl numbers.  src/bdr/abi.py mirrors it; a test compiles a
 * probe against this file and compares every size, offset and number.
 *
 * Shared ring, mapped from /dev/<chardev_name> with one mmap() of
 * bdr_info.mmap_size bytes at offset 0:
 *
 *   offset 0              struct bdr_ring_ctl         (one page)
 *   desc_offset           struct bdr_record[nr_slots] (page aligned)
 *   data_offset           nr_slots * BDR_SLOT_DATA    (page aligned)
 *
 * Slot i (i = position % nr_slots) holds one record: its descriptor at
 * desc_offset + i * sizeof(struct bdr_record) and up to BDR_SLOT_DATA bytes
 * of data at data_offset + i * BDR_SLOT_DATA.  A bio larger than one slot
 * becomes consecutive records with consecutive sequence numbers.
 *
 * Ordering rules:
 *  - The kernel is the only producer.  It fills slots [head, new_head) and
 *    then publishes with smp_store_release(&ctl->head, new_head).
 *  - The client is the only consumer.  It loads head with acquire semantics,
 *    reads the slots in [tail, head), and only after it no longer needs their
 *    contents stores the new tail (release).  The kernel never overwrites a
 *    slot in [tail, head).  A tail outside [old tail, head] is ignored.
 *  - head and tail are free-running 64-bit positions; head - tail <= nr_slots.
 *  - The consumer may also store seen (tail <= seen <= head): the position up
 *    to which it has read.  poll() then reports the ring readable only when
 *    head moved past seen, so a consumer that holds slots until they are
 *    acknowledged remotely does not wake up for records it already has.
 *  - instance is a random number drawn when the ring is created; sequence
 *    numbers are meaningful only together with it (a new target restarts
 *    them at 0, a table reload keeps the ring and its instance; a reload
 *    onto another device is refused).
 *  - next_seq is the sequence number of the record at head: the first one
 *    not yet published.  Records being copied behind head have no effect
 *    on it.  The kernel stores head, then next_seq: a consumer that loads
 *    next_seq (acquire) and then head sees next_seq <= the sequence
 *    number at head, and equal unless head moved in between.
 *  - One consumer: the chardev can be open for writing by one file at a
 *    time (a second writable open fails with EBUSY); read-only opens may
 *    use BDR_IOC_INFO and BDR_IOC_STATUS.  Only the writable file may take
 *    the dirty bitmap.  The kernel never reads back the fields it writes
 *    in bdr_ring_ctl; it reads only tail and seen, and checks them.
 *  - A bio is split so that it never needs more than min(nr_slots, 256)
 *    slots: every write fits in an empty ring.
 *  - A record is published only after its write completed successfully; a
 *    failed write is never published, its region is marked dirty instead.
 *    Writes that overlap an in-flight write are held back until it completes,
 *    so ring order equals the order in which overlapping data reached the disk.
 *  - When the ring is full the I/O path does not wait: the target enters the
 *    overflow state, marks the written regions in the dirty bitmap and stops
 *    publishing until BDR_IOC_TAKE_DIRTY hands the bitmap to the client and
 *    re-arms the ring.  Records already in the ring stay valid: they precede
 *    every write that went to the bitmap.
 *
 * All fields are in host byte order: the ring is shared memory on one host.
 */
#ifndef _UAPI_LINUX_BDR_H
#define _UAPI_LINUX_BDR_H

#include <linux/types.h>
#include <linux/ioctl.h>

#define BDR_MAGIC		0x31524442U	/* "BDR1" little endian */
#define BDR_ABI_VERSION		1U
#define BDR_SLOT_DATA		4096U		/* data bytes per ring slot */
#define BDR_SECTOR_SHIFT	9
#define BDR_DEFAULT_REGION_SECTORS 128U		/* dirty bitmap: 64 KiB regions */
#define BDR_MAX_SLOTS		(1U << 24)
#define BDR_NAME_MAX		32

/* bdr_record.op */
enum bdr_op {
	BDR_OP_WRITE		= 1,	/* data write, len bytes follow in the slot */
	BDR_OP_FLUSH		= 2,	/* durability point: all earlier records */
	BDR_OP_DISCARD		= 3,	/* range discarded, no data */
	BDR_OP_WRITE_ZEROES	= 4,	/* range zeroed, no data */
};

/* bdr_record.flags */
#define BDR_REC_FUA		(1U << 0)	/* the write was REQ_FUA */
#define BDR_REC_CONT		(1U << 1)	/* continues the previous record's bio */
#define BDR_REC_MORE		(1U << 2)	/* the next record continues this bio */

/*
 * One record descriptor, 32 bytes:
 *
 *   0       8       16      20  22  24      32
 *   +-------+-------+-------+---+---+-------+
 *   |  seq  | sector|  len  |op |flg|  rsvd |
 *   +-------+-------+-------+---+---+-------+
 *
 * seq: sequence number, +1 per record, never reused while the ring lives.
 * sector: first 512-byte sector on the device.  len: bytes covered (for a
 * write also the bytes of data in the slot; 0 for a flush).
 */
struct bdr_record {
	__u64 seq;
	__u64 sector;
	__u32 len;
	__u16 op;
	__u16 flags;
	__u64 reserved;
};

/* bdr_ring_ctl.state bits */
#define BDR_STATE_OVERFLOW	(1U << 0)	/* ring full: writes go to the bitmap */
#define BDR_STATE_DIRTY		(1U << 1)	/* the bitmap has regions to resync */
#define BDR_STATE_DEAD		(1U << 2)	/* the target was removed */
#define BDR_STATE_RECOVERED	(1U << 3)	/* the dirty bitmap was loaded from the
						 * meta_device when the ring was
						 * created (see BDR_IOC_TRACK_INFO);
						 * cleared by BDR_IOC_TAKE_DIRTY */

/* Page 0 of the mapping.  Producer and consumer fields on separate lines. */
struct bdr_ring_ctl {
	__u32 magic;
	__u32 abi_version;
	__u32 nr_slots;
	__u32 slot_data;
	__u64 desc_offset;
	__u64 data_offset;
	__u64 mmap_size;
	__u64 instance;			/* random, fixed for the ring's life */
	__u64 pad0[2];
	/* written by the kernel */
	__u64 head;
	__u64 state;
	__u64 next_seq;
	__u64 pad1[5];
	/* written by the client */
	__u64 tail;
	__u64 seen;
	__u64 pad2[6];
};

/* BDR_IOC_INFO: geometry of the target and of its ring */
struct bdr_info {
	__u32 magic;
	__u32 abi_version;
	__u32 nr_slots;
	__u32 slot_data;
	__u64 desc_offset;
	__u64 data_offset;
	__u64 mmap_size;
	__u64 dev_sectors;		/* size of the mapped device */
	__u32 region_sectors;		/* dirty bitmap granularity, grown so
					 * that nr_regions <= 2^25 */
	__u32 reserved0;
	__u64 nr_regions;		/* bits in the dirty bitmap */
	__u64 bitmap_bytes;		/* bytes BDR_IOC_TAKE_DIRTY copies out */
	__u64 instance;			/* as bdr_ring_ctl.instance */
	char name[BDR_NAME_MAX];	/* chardev name */
};

/* BDR_IOC_STATUS: counters, as in "dmsetup status" */
struct bdr_status {
	__u64 head;
	__u64 tail;
	__u64 next_seq;
	__u64 state;
	__u64 records;			/* records published */
	__u64 bytes;			/* data bytes published */
	__u64 dropped;			/* writes sent to the bitmap (ring full) */
	__u64 failed;			/* writes that failed on the device */
	__u64 dirty_regions;		/* bits set in the bitmap now */
	__u64 overflows;		/* times the ring overflowed */
};

/*
 * BDR_IOC_TAKE_DIRTY: atomically copy out the dirty bitmap, clear it, leave
 * the overflow state and re-arm the ring.  Every write completed before the
 * call is either in the ring before ring_head or in the returned bitmap;
 * every write after it is in the ring from ring_head on or in a later bitmap.
 * Every record before ring_head is published when the call returns (it waits
 * for copies still running): the consumer may read up to ring_head, then
 * scan the bitmap's regions, and no record it reads later is older than the
 * scan.  next_seq is the sequence number of the record at ring_head.
 * Requires the chardev open for writing (EBADF otherwise).
 * bitmap is a user pointer to bitmap_bytes (>= bdr_info.bitmap_bytes) bytes;
 * bit r (little-endian bit order within 64-bit words) covers sectors
 * [r * region_sectors, (r + 1) * region_sectors).
 */
struct bdr_dirty {
	__u64 bitmap;			/* in: user pointer */
	__u64 bitmap_bytes;		/* in: size of that buffer */
	__u64 ring_head;		/* out: handover position, published */
	__u64 next_seq;			/* out: first sequence number after it */
	__u64 nr_dirty;			/* out: bits set in the copied bitmap */
	__u64 state;			/* out: state before the handover */
};

/*
 * Persistent change tracking (the "meta_device <dev>" feature argument).
 *
 * The meta_device holds 4096-byte blocks, little endian:
 *   block 0   struct bdr_meta_header (the rest of the block is zero)
 *   block 1.. the tracking bitmap: bit r (byte r / 8, bit r % 8) covers the
 *             same sectors as bit r of the dirty bitmap
 * and must hold at least 4096 + bdr_info.bitmap_bytes rounded up to 4096.
 *
 * Rules:
 *  - A write, discard or write-zeroes goes to <device> only once the bits
 *    of all its regions are on the meta_device (written with FUA): after a
 *    crash, every region that may differ from the replica is marked.
 *  - Bits are cleared only by BDR_IOC_TRACK_CLEAR, which the client calls
 *    when the replica holds every write up to a ring position; <device> is
 *    flushed, then the header that names that position is written, then
 *    the zeros (lazily, by the worker that writes the marks).
 *  - A new ring whose meta_device holds a valid area loads its bits into
 *    the dirty bitmap and starts in BDR_STATE_RECOVERED (and
 *    BDR_STATE_DIRTY if any bit is set).  A zeroed block 0 is formatted
 *    with no bit set; anything else in it, or another geometry, is refused.
 *  - If a metadata write fails, tracking stops and every later write to
 *    the device fails (a write that cannot be tracked is never done).
 */
#define BDR_META_MAGIC		0x54524442U	/* "BDRT" little endian */
#define BDR_META_VERSION	1U
#define BDR_META_BLOCK		4096U

struct bdr_meta_header {
	__le32 magic;
	__le32 version;
	__le64 dev_sectors;		/* geometry the bitmap was made for */
	__le32 region_sectors;
	__le32 reserved0;
	__le64 nr_regions;
	__u8 clear_ring[16];		/* the client's name of the ring, the */
	__le64 clear_pos;		/* position and the client's generation */
	__le64 clear_generation;	/* of the last clear (zeros: none) */
	__le32 reserved2;
	__le32 crc;			/* crc32_le(~0, bytes 0..67) */
};

/* bdr_track.flags */
#define BDR_TRACK_ENABLED	(1U << 0)	/* the table has a meta_device */
#define BDR_TRACK_RECOVERED	(1U << 1)	/* its area was valid when loaded */
#define BDR_TRACK_FAILED	(1U << 2)	/* a metadata write failed */

/* BDR_IOC_TRACK_INFO: the change tracking of the ring (zeros without one) */
struct bdr_track {
	__u64 flags;
	__u8 clear_ring[16];		/* the last clear as loaded, or as */
	__u64 clear_pos;		/* set since by BDR_IOC_TRACK_CLEAR */
	__u64 clear_generation;
	__u64 loaded_regions;		/* bits set when the area was loaded */
	__u64 marked_regions;		/* bits set now */
	__u64 meta_writes;		/* metadata blocks written */
	__u64 clears;			/* BDR_IOC_TRACK_CLEAR calls that cleared */
};

/*
 * BDR_IOC_TRACK_CLEAR: the replica durably holds every record before ring
 * position pos and every region of every bitmap taken so far; clear every
 * tracking bit (nothing is written if none is set and ring and generation
 * are unchanged).  Refused with EBUSY unless head == pos, no write is in
 * flight and the ring is neither overflowing nor dirty.  Requires the
 * chardev open for writing (EBADF); EOPNOTSUPP without a meta_device; EIO
 * once tracking failed.
 */
struct bdr_track_clear {
	__u64 pos;
	__u8 ring[16];			/* the client's name of this ring and */
	__u64 generation;		/* its generation, kept in the header */
};

#define BDR_IOC_MAGIC		0xBD
#define BDR_IOC_INFO		_IOR(BDR_IOC_MAGIC, 1, struct bdr_info)
#define BDR_IOC_STATUS		_IOR(BDR_IOC_MAGIC, 2, struct bdr_status)
#define BDR_IOC_TAKE_DIRTY	_IOWR(BDR_IOC_MAGIC, 3, struct bdr_dirty)
#define BDR_IOC_TRACK_INFO	_IOR(BDR_IOC_MAGIC, 4, struct bdr_track)
#define BDR_IOC_TRACK_CLEAR	_IOW(BDR_IOC_MAGIC, 5, struct bdr_track_clear)
/* pos: the client's tail; clears the marks of the epoch before the current one */
#define BDR_IOC_TRACK_ROTATE	_IOW(BDR_IOC_MAGIC, 6, struct bdr_track_clear)

#endif /* _UAPI_LINUX_BDR_H */
