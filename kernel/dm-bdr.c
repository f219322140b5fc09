// SPDX-License-Identifier: GPL-2.0-only
/*
 * dm-bdr: the "bdr" device-mapper target of BDR, the block device replicator.
 *
 * The target passes all I/O straight to one underlying device and copies
 * every write that completed successfully into a ring shared with a
 * userspace client (mmap of /dev/<chardev_name>), which ships the writes to
 * a replica.  The ABI (ring layout, record format, ioctls) and its ordering
 * rules are described in bdr_uapi.h; the table line, status fields and
 * module parameters in docs/dm-bdr.md.
 *
 * Rules of the I/O path:
 *  - It never waits for userspace.  When the ring is full the target enters
 *    the overflow state and marks the written regions in a dirty bitmap; the
 *    client later takes the bitmap (BDR_IOC_TAKE_DIRTY) and resyncs those
 *    regions.
 *  - A record is published when its bio completed successfully (end_io), so
 *    a failed write is never shipped as if it had succeeded; its region is
 *    marked dirty instead, because the device may hold part of it.
 *  - A write, discard or write-zeroes that overlaps one still in flight is
 *    held back until that one completed and reserved its slots.  Overlapping
 *    writes therefore reach the disk and the ring in the same order, and a
 *    replay of the ring equals the device.
 *  - Publishing has three steps.  Under the ring lock, in completion order,
 *    end_io reserves the record's slots (O(1): a position, counters, one
 *    reservation word).  Without the lock, the descriptors are filled and
 *    the data is copied: inline for small bios, on an unbound workqueue for
 *    large ones, which holds the bio (DM_ENDIO_INCOMPLETE) until its copy is
 *    done, so that the copies of several bios run on several CPUs while the
 *    completion path stays short.  Under the lock again the reservation is
 *    marked done and head moves over every done reservation at its front,
 *    published with release semantics.  Ring order is reservation order.
 *  - The sequence number of the record at ring position p is p: a new ring
 *    starts both at 0, and a reload keeps the ring.
 *
 * Lifetime: the ring (struct bdr_ring) embeds the struct device of the
 * chardev and is refcounted through it.  Targets (a table reload gives two
 * at once for the same mapped device), open files and thus mappings each
 * hold a reference; "dmsetup remove" with the chardev open or mapped only
 * marks the ring dead, the memory goes when the last file is closed.
 *
 * The kernel never reads back what it wrote into the control page: the
 * client can write to all of it.  It reads only the consumer fields there
 * (tail, seen), and checks them.
 *
 * Persistent change tracking (feature argument "meta_device <dev>", layout
 * and rules in bdr_uapi.h): a write whose regions are not yet marked on the
 * meta device waits (DM_MAPIO_SUBMITTED) on the ring's meta list while one
 * worker writes the marked bitmap blocks with FUA; it is then admitted like
 * any other write.  Marks are cleared only by BDR_IOC_TRACK_CLEAR, with no
 * write in flight; the cleared blocks are written by the same worker, in
 * order, so a mark made after a clear is never overwritten by its zeros.
 */

#include <linux/bio.h>
#include <linux/bitmap.h>
#include <linux/blkdev.h>
#include <linux/cdev.h>
#include <linux/crc32.h>
#include <linux/ctype.h>
#include <linux/delay.h>
#include <linux/device-mapper.h>
#include <linux/fs.h>
#include <linux/idr.h>
#include <linux/init.h>
#include <linux/kernel.h>
#include <linux/list.h>
#include <linux/math64.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/namei.h>
#include <linux/overflow.h>
#include <linux/poll.h>
#include <linux/random.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/uaccess.h>
#include <linux/vmalloc.h>
#include <linux/wait.h>
#include <linux/workqueue.h>

#include "bdr_uapi.h"

#define DM_MSG_PREFIX "bdr"

#define BDR_MINORS		1024
#define BDR_MAX_REGION_SECTORS	(1U << 24)
/* Dirty bitmap: at most 2^25 bits (4 MiB); larger devices get larger regions. */
#define BDR_MAX_REGIONS		(1U << 25)
#define BDR_SLOT_SECTORS	(BDR_SLOT_DATA >> SECTOR_SHIFT)
/* A bio of more slots than this is copied on the copy workqueue. */
#define BDR_INLINE_SLOTS	4U
#define BDR_RESV_DONE		(1U << 31)

static unsigned int copy_delay_ms;
module_param(copy_delay_ms, uint, 0644);
MODULE_PARM_DESC(copy_delay_ms,
		 "Testing only: sleep this many ms before copying a bio of more than 4 slots (default 0)");

static struct workqueue_struct *bdr_copy_wq;
static struct workqueue_struct *bdr_meta_wq;

#define BDR_META_SECTORS	(BDR_META_BLOCK >> SECTOR_SHIFT)
#define BDR_META_BITS		(BDR_META_BLOCK * 8U)
#define BDR_META_CRC_BYTES	offsetof(struct bdr_meta_header, crc)

struct bdr_ring;

/* Persistent change tracking of a ring: its meta_device and marks. */
struct bdr_meta {
	struct bdr_ring *ring;
	struct block_device *bdev;	/* of the tables' meta_device */
	struct block_device *data;	/* the tables' <device>: flushed before a clear is written */
	dev_t devt;
	u32 nr_blocks;			/* bitmap blocks, after the header block */
	struct page *page;		/* one block of I/O, the worker's */
	struct bio bio;			/* the worker's, not from a shared bio_set: */
	struct bio_vec bvec;		/* writes wait for it under memory pressure */
	struct work_struct work;

	spinlock_t lock;		/* all below; taken before ring->lock */
	unsigned long *bits;		/* marks, as the device will hold them */
	unsigned long *durable;		/* marks known to be on the device */
	unsigned long *dirty_blocks;	/* bitmap blocks to write */
	bool header_dirty;
	u8 clear_ring[16];		/* the last clear (as in the header) */
	u64 clear_pos;
	u64 clear_generation;
	u64 writes;			/* tracked writes from map to end_io */
	/*
	 * Epochs, for BDR_IOC_TRACK_ROTATE: epoch[e] holds the regions of
	 * the writes mapped or ended in epoch e (parity), epoch_writes[e]
	 * counts those mapped in it still before end_io; the current epoch
	 * began at ring position epoch_start.
	 */
	unsigned long *epoch[2];
	u64 epoch_writes[2];
	u64 epoch_start;
	unsigned int cur;
	struct list_head waiting;	/* bdr_io waiting for their marks */
	int error;			/* a metadata write failed: writes fail */
	bool dying;			/* the last table is going: no more work */
	bool recovered;
	u64 loaded, meta_writes, clears, rotations;
};

struct bdr_ring {
	struct device dev;		/* refcount of the whole ring */
	struct cdev cdev;
	struct list_head node;		/* in bdr_rings while targets use it */
	char name[BDR_NAME_MAX];
	struct mapped_device *md;	/* owner: only its tables may share */
	dev_t lower;			/* the <device> of those tables */
	unsigned int targets;		/* targets using the ring, bdr_lock */
	bool registered;		/* chardev visible, bdr_lock */
	atomic_t writers;		/* writable opens: the consumer, 0 or 1 */

	/* fixed geometry, the kernel's own copies of what ctl shows */
	u32 nr_slots;
	u32 region_shift;
	sector_t dev_sectors;
	u32 nr_regions;
	size_t bitmap_bytes;
	size_t desc_offset;
	size_t data_offset;
	u64 instance;
	void *mem;			/* vmalloc_user: ctl | desc | data */
	size_t mem_size;
	struct bdr_ring_ctl *ctl;
	struct bdr_record *desc;
	u8 *data;

	/* producer state, under lock */
	spinlock_t lock;
	u64 head;			/* published: slots before it are complete */
	u64 reserve;			/* reserved: slots before it have an owner */
	u32 head_slot;			/* head % nr_slots */
	u32 reserve_slot;		/* reserve % nr_slots */
	u32 *resv;			/* per slot: length of the reservation
					 * starting there, | BDR_RESV_DONE once
					 * its slots are filled */
	u64 tail;			/* last tail validated from ctl */
	u64 state;
	unsigned long *bitmap;		/* dirty regions, active */
	u64 records, bytes, dropped, failed, overflows;
	bool dead;

	struct mutex take_lock;		/* serialises BDR_IOC_TAKE_DIRTY */
	unsigned long *spare;		/* zeroed bitmap swapped in by take */

	wait_queue_head_t wq;		/* poll() and the handover wait here */

	struct bdr_meta *meta;		/* NULL without a meta_device */
};

/* Per-target context. */
struct bdr_c {
	struct dm_dev *dev;
	struct dm_dev *meta_dev;		/* NULL without change tracking */
	struct bdr_ring *ring;

	spinlock_t io_lock;
	struct list_head inflight;	/* bdr_io of writes being written */
	struct list_head waiting;	/* bdr_io held back by an overlap */
	struct list_head ready;		/* released, to be submitted */
	struct work_struct submit_work;
	struct workqueue_struct *wq;
};

/* Per-bio data, allocated by dm in front of each clone. */
struct bdr_io {
	struct list_head list;
	sector_t start, end;		/* [start, end) on the device */
	struct bvec_iter iter;		/* data of the clone, saved at map */
	struct work_struct copy_work;	/* deferred copy of a large bio */
	struct bdr_c *bc;
	u64 pos;			/* first reserved ring position */
	u32 slot;			/* pos % nr_slots */
	u16 op;				/* enum bdr_op, 0: not published */
	u16 flags;			/* BDR_REC_FUA, from the bio at map time */
	bool tracked;			/* on inflight or waiting */
	bool copied;			/* the deferred copy is done */
	bool meta_counted;		/* counted in meta->writes */
	u8 meta_epoch;			/* ... and in this epoch's writes */
};

static DEFINE_MUTEX(bdr_lock);		/* bdr_rings, ring->targets */
static LIST_HEAD(bdr_rings);
static DEFINE_IDA(bdr_minor_ida);
static dev_t bdr_devt;

static const struct class bdr_class = {
	.name = "bdr",
};

/* ---------------------------------------------------------------------- */
/* Ring: producer side                                                     */

static u32 bdr_slot_add(const struct bdr_ring *r, u32 slot, u32 n)
{
	slot += n;		/* slot < nr_slots <= 2^24 and n <= nr_slots */
	return slot >= r->nr_slots ? slot - r->nr_slots : slot;
}

/* Mark the regions of [start, end) dirty.  Under r->lock. */
/*
 * The regions of sectors [start, end), clipped to the device: [*first,
 * *last]; false if there is none.  nr_regions <= BDR_MAX_REGIONS: a u32
 * (and the bitmap API's unsigned int) holds every region number.
 */
static bool bdr_regions(const struct bdr_ring *r, sector_t start, sector_t end, u32 *first,
			u32 *last)
{
	u64 f, l;

	if (end <= start)
		return false;
	f = start >> r->region_shift;
	l = min_t(u64, (end - 1) >> r->region_shift, r->nr_regions - 1);
	if (f > l)
		return false;
	*first = f;
	*last = l;
	return true;
}

static void bdr_mark_dirty(struct bdr_ring *r, sector_t start, sector_t end)
{
	u32 first, last;

	if (!bdr_regions(r, start, end, &first, &last))
		return;
	bitmap_set(r->bitmap, first, last - first + 1);
	r->state |= BDR_STATE_DIRTY;
}

/* The consumer's tail, accepted only if it lies in [tail, head]. */
static u64 bdr_consumer_tail(struct bdr_ring *r)
{
	u64 t = smp_load_acquire(&r->ctl->tail);

	if (t - r->tail <= r->head - r->tail)
		r->tail = t;
	return r->tail;
}

static void bdr_set_state(struct bdr_ring *r, u64 state)
{
	WRITE_ONCE(r->state, state);
	WRITE_ONCE(r->ctl->state, state);
}

/* Move head over the done reservations at its front.  Under r->lock. */
static void bdr_advance_head(struct bdr_ring *r)
{
	u64 head = r->head;

	while (head != r->reserve) {
		u32 *resv = &r->resv[r->head_slot];
		u32 n = *resv & ~BDR_RESV_DONE;

		if (!(*resv & BDR_RESV_DONE))
			break;
		*resv = 0;
		head += n;
		r->head_slot = bdr_slot_add(r, r->head_slot, n);
	}
	if (head != r->head) {
		WRITE_ONCE(r->head, head);
		/* Slots before head are complete: pairs with the consumer's acquire. */
		smp_store_release(&r->ctl->head, head);
		/*
		 * The sequence number of the record at position p is p.  Stored
		 * after head, so that a consumer that loads next_seq and then
		 * head never sees next_seq ahead of head (bdr_uapi.h).
		 */
		smp_store_release(&r->ctl->next_seq, head);
	}
}

static void bdr_wake(struct bdr_ring *r)
{
	/* wq_has_sleeper() has the barrier that pairs with bdr_poll()'s. */
	if (wq_has_sleeper(&r->wq))
		wake_up(&r->wq);
}

/*
 * Fill the descriptors of io's reservation and copy its data into the slots.
 * Runs without the lock: the slots are io's until it is marked done, and the
 * consumer cannot see them before head moves over them.
 */
static void bdr_fill(struct bdr_ring *r, struct bio *bio, struct bdr_io *io)
{
	u32 bytes = io->iter.bi_size;
	struct bdr_record *rec;
	struct bvec_iter iter;
	struct bio_vec bv;
	u32 slot = io->slot;
	u32 off = 0;		/* offset inside the current slot */
	u32 i, nslots;

	if (io->op != BDR_OP_WRITE) {
		rec = &r->desc[slot];
		rec->seq = io->pos;
		rec->sector = io->start;
		rec->len = io->op == BDR_OP_FLUSH ? 0 : bytes;
		rec->op = io->op;
		rec->flags = 0;
		rec->reserved = 0;
		return;
	}

	nslots = DIV_ROUND_UP(bytes, BDR_SLOT_DATA);
	for (i = 0; i < nslots; i++) {
		u16 f = io->flags;

		if (i)
			f |= BDR_REC_CONT;
		if (i + 1 < nslots)
			f |= BDR_REC_MORE;
		rec = &r->desc[slot];
		rec->seq = io->pos + i;
		rec->sector = io->start + (sector_t)i * BDR_SLOT_SECTORS;
		rec->len = min_t(u32, bytes - i * BDR_SLOT_DATA, BDR_SLOT_DATA);
		rec->op = BDR_OP_WRITE;
		rec->flags = f;
		rec->reserved = 0;
		slot = bdr_slot_add(r, slot, 1);
	}

	slot = io->slot;
	__bio_for_each_segment(bv, bio, iter, io->iter) {
		u32 done = 0;

		while (done < bv.bv_len) {
			u8 *dst = r->data + (size_t)slot * BDR_SLOT_DATA + off;
			u32 n = min(bv.bv_len - done, BDR_SLOT_DATA - off);
			void *src = bvec_kmap_local(&bv);

			memcpy(dst, src + done, n);
			kunmap_local(src);
			done += n;
			off += n;
			if (off == BDR_SLOT_DATA) {
				off = 0;
				slot = bdr_slot_add(r, slot, 1);
			}
		}
	}
}

/* io's slots are filled: let head move over them. */
static void bdr_complete(struct bdr_ring *r, struct bdr_io *io)
{
	unsigned long irqflags;

	spin_lock_irqsave(&r->lock, irqflags);
	r->resv[io->slot] |= BDR_RESV_DONE;
	bdr_advance_head(r);
	spin_unlock_irqrestore(&r->lock, irqflags);
	bdr_wake(r);
}

enum bdr_reserved { BDR_NOT_PUBLISHED, BDR_RESERVED };

/*
 * Reserve slots for the completed clone, or send it to the bitmap.  Called
 * from end_io (any context) with nothing held; O(1) under the lock but for
 * the bitmap update of a dropped or failed write.
 */
static enum bdr_reserved bdr_reserve(struct bdr_ring *r, struct bdr_io *io,
				     blk_status_t status)
{
	u32 bytes = io->iter.bi_size;
	unsigned long irqflags;
	bool overflowed = false;
	u32 nslots;

	nslots = io->op == BDR_OP_WRITE ? DIV_ROUND_UP(bytes, BDR_SLOT_DATA) : 1;

	spin_lock_irqsave(&r->lock, irqflags);
	if (unlikely(status != BLK_STS_OK)) {
		/* The device may hold any part of it: resync the region. */
		r->failed++;
		bdr_mark_dirty(r, io->start, io->end);
		bdr_set_state(r, r->state);
		spin_unlock_irqrestore(&r->lock, irqflags);
		DMWARN_LIMIT("%s: a write of %u bytes at sector %llu failed (%d): its regions will be resynced",
			     r->name, bytes, (unsigned long long)io->start,
			     blk_status_to_errno(status));
		bdr_wake(r);
		return BDR_NOT_PUBLISHED;
	}
	if (r->state & BDR_STATE_OVERFLOW)
		goto drop;
	if (r->nr_slots - (r->reserve - bdr_consumer_tail(r)) < nslots) {
		r->overflows++;
		overflowed = true;
		bdr_set_state(r, r->state | BDR_STATE_OVERFLOW);
		goto drop;
	}

	io->pos = r->reserve;
	io->slot = r->reserve_slot;
	r->reserve += nslots;
	r->reserve_slot = bdr_slot_add(r, r->reserve_slot, nslots);
	r->resv[io->slot] = nslots;
	r->records += nslots;
	if (io->op == BDR_OP_WRITE)
		r->bytes += bytes;
	spin_unlock_irqrestore(&r->lock, irqflags);
	return BDR_RESERVED;

drop:
	r->dropped++;
	bdr_mark_dirty(r, io->start, io->end);
	bdr_set_state(r, r->state);
	spin_unlock_irqrestore(&r->lock, irqflags);
	if (overflowed)
		DMWARN_LIMIT("%s: ring full (%u slots): writes go to the dirty bitmap until the client takes it",
			     r->name, r->nr_slots);
	bdr_wake(r);
	return BDR_NOT_PUBLISHED;
}

static void bdr_copy_work(struct work_struct *work)
{
	struct bdr_io *io = container_of(work, struct bdr_io, copy_work);
	struct bio *bio = dm_bio_from_per_bio_data(io, sizeof(*io));
	struct bdr_ring *r = io->bc->ring;
	unsigned int delay = READ_ONCE(copy_delay_ms);

	if (unlikely(delay))
		msleep(delay);
	bdr_fill(r, bio, io);
	bdr_complete(r, io);
	io->copied = true;
	/* Back through clone_endio into bdr_end_io, which now says done. */
	bio_endio(bio);
}

/* ---------------------------------------------------------------------- */
/* Ring: allocation and lifetime                                           */

/* What the table line asks for, as the ring needs it. */
struct bdr_geometry {
	const char *name;
	u32 nr_slots;
	u32 region_sectors;		/* after growing to fit BDR_MAX_REGIONS */
	sector_t dev_sectors;
	dev_t lower;
	struct mapped_device *md;
	struct block_device *meta_bdev;	/* NULL: no change tracking */
	struct block_device *lower_bdev;
};

static void bdr_meta_free(struct bdr_meta *m)
{
	if (!m)
		return;
	cancel_work_sync(&m->work);
	if (m->page)
		__free_page(m->page);
	kvfree(m->bits);
	kvfree(m->durable);
	kvfree(m->epoch[0]);
	kvfree(m->epoch[1]);
	bitmap_free(m->dirty_blocks);
	kfree(m);
}

static void bdr_ring_free_mem(struct bdr_ring *r)
{
	vfree(r->mem);
	kvfree(r->resv);
	kvfree(r->bitmap);
	kvfree(r->spare);
	bdr_meta_free(r->meta);
}

/* Read or write metadata block nr (0: the header) through m->page. */
static int bdr_meta_io(struct bdr_meta *m, u32 nr, blk_opf_t opf)
{
	int ret;

	bio_init(&m->bio, m->bdev, &m->bvec, 1, opf);
	m->bio.bi_iter.bi_sector = (sector_t)nr * BDR_META_SECTORS;
	__bio_add_page(&m->bio, m->page, BDR_META_BLOCK, 0);
	ret = submit_bio_wait(&m->bio);
	bio_uninit(&m->bio);
	return ret;
}

static int bdr_meta_write(struct bdr_meta *m, u32 nr)
{
	m->meta_writes++;
	return bdr_meta_io(m, nr, REQ_OP_WRITE | REQ_SYNC | REQ_FUA | REQ_META | REQ_PRIO);
}

/* Write the header naming the last clear. */
static int bdr_meta_write_header(struct bdr_meta *m, const u8 *ring, u64 pos, u64 generation)
{
	struct bdr_ring *r = m->ring;
	struct bdr_meta_header *h = page_address(m->page);

	memset(h, 0, BDR_META_BLOCK);
	h->magic = cpu_to_le32(BDR_META_MAGIC);
	h->version = cpu_to_le32(BDR_META_VERSION);
	h->dev_sectors = cpu_to_le64(r->dev_sectors);
	h->region_sectors = cpu_to_le32(1U << r->region_shift);
	h->nr_regions = cpu_to_le64(r->nr_regions);
	memcpy(h->clear_ring, ring, sizeof(h->clear_ring));
	h->clear_pos = cpu_to_le64(pos);
	h->clear_generation = cpu_to_le64(generation);
	h->crc = cpu_to_le32(crc32_le(~0U, (const u8 *)h, BDR_META_CRC_BYTES));
	return bdr_meta_write(m, 0);
}

/* Copy bitmap block nr of m->bits to m->page.  Under m->lock. */
static void bdr_meta_copy_block(struct bdr_meta *m, u32 nr)
{
	memcpy(page_address(m->page), (u8 *)m->bits + (size_t)nr * BDR_META_BLOCK, BDR_META_BLOCK);
}

/*
 * The tracking area of a new ring: format a zeroed one, or load a valid one
 * into the dirty bitmap (BDR_STATE_RECOVERED).  Called before the ring is
 * visible, without locks.
 */
static void bdr_meta_work(struct work_struct *work);

static int bdr_meta_load(struct bdr_ring *r, struct block_device *bdev, struct block_device *data,
			 char **error)
{
	const struct bdr_meta_header *h;
	struct bdr_meta *m;
	u32 i, total_bits;
	int ret;

	if (IS_ENABLED(CONFIG_CPU_BIG_ENDIAN)) {
		*error = "meta_device needs a little-endian host";
		return -EINVAL;
	}
	m = kzalloc(sizeof(*m), GFP_KERNEL);
	if (!m) {
		*error = "Cannot allocate the tracking state";
		return -ENOMEM;
	}
	r->meta = m;		/* freed with the ring */
	m->ring = r;
	m->bdev = bdev;
	m->data = data;
	m->devt = bdev->bd_dev;
	m->nr_blocks = DIV_ROUND_UP(r->bitmap_bytes, BDR_META_BLOCK);
	total_bits = m->nr_blocks * BDR_META_BITS;
	spin_lock_init(&m->lock);
	INIT_LIST_HEAD(&m->waiting);
	INIT_WORK(&m->work, bdr_meta_work);
	m->page = alloc_page(GFP_KERNEL);
	m->bits = kvzalloc((size_t)m->nr_blocks * BDR_META_BLOCK, GFP_KERNEL);
	m->durable = kvzalloc((size_t)m->nr_blocks * BDR_META_BLOCK, GFP_KERNEL);
	m->epoch[0] = kvzalloc((size_t)m->nr_blocks * BDR_META_BLOCK, GFP_KERNEL);
	m->epoch[1] = kvzalloc((size_t)m->nr_blocks * BDR_META_BLOCK, GFP_KERNEL);
	m->dirty_blocks = bitmap_zalloc(m->nr_blocks, GFP_KERNEL);
	if (!m->page || !m->bits || !m->durable || !m->epoch[0] || !m->epoch[1] || !m->dirty_blocks) {
		*error = "Cannot allocate the tracking bitmap";
		return -ENOMEM;
	}
	if (bdev_nr_bytes(bdev) < (u64)(1 + m->nr_blocks) * BDR_META_BLOCK) {
		*error = "meta_device too small: it needs 4096 bytes plus one bit per region, in 4096-byte blocks";
		return -EINVAL;
	}
	ret = bdr_meta_io(m, 0, REQ_OP_READ | REQ_META | REQ_PRIO);
	if (ret) {
		*error = "Cannot read the meta_device";
		return ret;
	}
	h = page_address(m->page);
	if (!memchr_inv(h, 0, BDR_META_BLOCK)) {
		/* A new area: no bit set, written before any write is let through. */
		memset(page_address(m->page), 0, BDR_META_BLOCK);
		for (i = 0; i < m->nr_blocks; i++) {
			ret = bdr_meta_write(m, 1 + i);
			if (ret)
				goto write_failed;
		}
		ret = bdr_meta_write_header(m, m->clear_ring, 0, 0);
		if (ret)
			goto write_failed;
		DMINFO("%s: meta_device formatted: %u regions tracked", r->name, r->nr_regions);
		return 0;
	}
	if (le32_to_cpu(h->magic) != BDR_META_MAGIC || le32_to_cpu(h->version) != BDR_META_VERSION) {
		*error = "meta_device holds no bdr tracking area: zero its first 4096 bytes to use it";
		return -EINVAL;
	}
	if (le32_to_cpu(h->crc) != crc32_le(~0U, (const u8 *)h, BDR_META_CRC_BYTES)) {
		*error = "meta_device's tracking header is damaged (checksum): zero its first 4096 bytes to start afresh";
		return -EINVAL;
	}
	if (le64_to_cpu(h->dev_sectors) != r->dev_sectors ||
	    le32_to_cpu(h->region_sectors) != 1U << r->region_shift ||
	    le64_to_cpu(h->nr_regions) != r->nr_regions) {
		*error = "meta_device tracks another device size or region size: zero its first 4096 bytes to start afresh";
		return -EINVAL;
	}
	memcpy(m->clear_ring, h->clear_ring, sizeof(m->clear_ring));
	m->clear_pos = le64_to_cpu(h->clear_pos);
	m->clear_generation = le64_to_cpu(h->clear_generation);
	for (i = 0; i < m->nr_blocks; i++) {
		ret = bdr_meta_io(m, 1 + i, REQ_OP_READ | REQ_META | REQ_PRIO);
		if (ret) {
			*error = "Cannot read the meta_device's bitmap";
			return ret;
		}
		memcpy((u8 *)m->bits + (size_t)i * BDR_META_BLOCK, page_address(m->page),
		       BDR_META_BLOCK);
	}
	bitmap_clear(m->bits, r->nr_regions, total_bits - r->nr_regions);
	bitmap_copy(m->durable, m->bits, total_bits);
	bitmap_copy(r->bitmap, m->bits, r->nr_regions);
	m->loaded = bitmap_weight(m->bits, r->nr_regions);
	m->recovered = true;
	r->state = BDR_STATE_RECOVERED | (m->loaded ? BDR_STATE_DIRTY : 0);
	r->ctl->state = r->state;
	DMINFO("%s: meta_device loaded: %llu of %u regions may differ from the replica",
	       r->name, m->loaded, r->nr_regions);
	return 0;

write_failed:
	*error = "Cannot write the meta_device";
	return ret;
}

static void bdr_ring_release(struct device *dev)
{
	struct bdr_ring *r = container_of(dev, struct bdr_ring, dev);

	ida_free(&bdr_minor_ida, MINOR(dev->devt));
	bdr_ring_free_mem(r);
	kfree(r);
}

static unsigned long *bdr_bitmap_alloc(u32 nbits)
{
	return kvcalloc(BITS_TO_LONGS(nbits), sizeof(unsigned long), GFP_KERNEL);
}

/* A new ring, not yet visible.  Called without bdr_lock: it may sleep long. */
static struct bdr_ring *bdr_ring_alloc(const struct bdr_geometry *geo, char **error)
{
	size_t desc_bytes = PAGE_ALIGN(array_size(geo->nr_slots, sizeof(struct bdr_record)));
	size_t data_bytes = array_size(geo->nr_slots, BDR_SLOT_DATA);
	struct bdr_ring *r;
	int minor, ret;

	r = kzalloc(sizeof(*r), GFP_KERNEL);
	if (!r) {
		*error = "Cannot allocate ring state";
		return ERR_PTR(-ENOMEM);
	}
	strscpy(r->name, geo->name, sizeof(r->name));
	r->md = geo->md;
	r->lower = geo->lower;
	r->nr_slots = geo->nr_slots;
	r->region_shift = ilog2(geo->region_sectors);
	r->dev_sectors = geo->dev_sectors;
	r->nr_regions = max_t(u64, 1, DIV_ROUND_UP_ULL(geo->dev_sectors, geo->region_sectors));
	r->bitmap_bytes = BITS_TO_LONGS(r->nr_regions) * sizeof(unsigned long);
	r->desc_offset = PAGE_SIZE;
	r->data_offset = PAGE_SIZE + desc_bytes;
	r->instance = get_random_u64();
	atomic_set(&r->writers, 0);
	spin_lock_init(&r->lock);
	mutex_init(&r->take_lock);
	init_waitqueue_head(&r->wq);
	INIT_LIST_HEAD(&r->node);

	r->mem_size = size_add(r->data_offset, data_bytes);
	r->mem = vmalloc_user(r->mem_size);
	r->bitmap = bdr_bitmap_alloc(r->nr_regions);
	r->spare = bdr_bitmap_alloc(r->nr_regions);
	r->resv = kvcalloc(geo->nr_slots, sizeof(*r->resv), GFP_KERNEL);
	if (!r->mem || !r->bitmap || !r->spare || !r->resv) {
		*error = r->mem ? "Cannot allocate the dirty bitmap" : "Cannot allocate ring buffer";
		ret = -ENOMEM;
		goto free_mem;
	}
	r->ctl = r->mem;
	r->desc = r->mem + r->desc_offset;
	r->data = r->mem + r->data_offset;
	r->ctl->magic = BDR_MAGIC;
	r->ctl->abi_version = BDR_ABI_VERSION;
	r->ctl->nr_slots = r->nr_slots;
	r->ctl->slot_data = BDR_SLOT_DATA;
	r->ctl->desc_offset = r->desc_offset;
	r->ctl->data_offset = r->data_offset;
	r->ctl->mmap_size = r->mem_size;
	r->ctl->instance = r->instance;
	if (geo->meta_bdev) {
		ret = bdr_meta_load(r, geo->meta_bdev, geo->lower_bdev, error);
		if (ret)
			goto free_mem;
	}

	minor = ida_alloc_max(&bdr_minor_ida, BDR_MINORS - 1, GFP_KERNEL);
	if (minor < 0) {
		*error = "Too many bdr targets";
		ret = minor;
		goto free_mem;
	}
	/* From here on the device owns r: bdr_ring_release frees it. */
	device_initialize(&r->dev);
	r->dev.class = &bdr_class;
	r->dev.devt = MKDEV(MAJOR(bdr_devt), minor);
	r->dev.release = bdr_ring_release;
	ret = dev_set_name(&r->dev, "%s", geo->name);
	if (ret) {
		*error = "Cannot name the character device";
		put_device(&r->dev);
		return ERR_PTR(ret);
	}
	return r;

free_mem:
	bdr_ring_free_mem(r);
	kfree(r);
	return ERR_PTR(ret);
}

static const struct file_operations bdr_fops;

/*
 * The live ring named geo->name, with a new target reference, or NULL if
 * there is none.  Only a reload of the same mapped device onto the same
 * device with the same geometry may share a ring.  Called under bdr_lock.
 */
static struct bdr_ring *bdr_ring_find(const struct bdr_geometry *geo, char **error)
{
	struct bdr_ring *r;

	list_for_each_entry(r, &bdr_rings, node) {
		if (strcmp(r->name, geo->name))
			continue;
		if (r->md != geo->md) {
			*error = "Character device name already in use by another bdr target";
			return ERR_PTR(-EBUSY);
		}
		if (r->lower != geo->lower) {
			*error = "A reload cannot change <device>: the ring holds its writes; remove and create the target";
			return ERR_PTR(-EINVAL);
		}
		if ((r->meta ? r->meta->devt : 0) != (geo->meta_bdev ? geo->meta_bdev->bd_dev : 0)) {
			*error = "A reload cannot add, remove or change meta_device: remove and create the target";
			return ERR_PTR(-EINVAL);
		}
		if (r->nr_slots != geo->nr_slots || r->region_shift != ilog2(geo->region_sectors) ||
		    r->dev_sectors != geo->dev_sectors) {
			*error = "Ring geometry cannot change on reload: remove and create the target";
			return ERR_PTR(-EINVAL);
		}
		r->targets++;
		get_device(&r->dev);
		return r;
	}
	return NULL;
}

/* Is /dev/<name> taken by something else (a device node, "mapper", ...)? */
static bool bdr_dev_name_taken(const char *name)
{
	char path[sizeof("/dev/") + BDR_NAME_MAX];
	struct path p;

	snprintf(path, sizeof(path), "/dev/%s", name);
	if (kern_path(path, 0, &p))
		return false;
	path_put(&p);
	return true;
}

/* Another live ring keeps its marks on this meta device.  Under bdr_lock. */
static bool bdr_meta_taken(const struct bdr_geometry *geo)
{
	struct bdr_ring *r;

	if (!geo->meta_bdev)
		return false;
	list_for_each_entry(r, &bdr_rings, node)
		if (r->meta && r->meta->devt == geo->meta_bdev->bd_dev && r->md != geo->md)
			return true;
	return false;
}

/* Find the ring of a reloaded table, or create and register a new one. */
static struct bdr_ring *bdr_ring_get(const struct bdr_geometry *geo, char **error)
{
	struct bdr_ring *r, *fresh;
	bool taken;
	int ret;

	mutex_lock(&bdr_lock);
	r = bdr_ring_find(geo, error);
	taken = !r && bdr_meta_taken(geo);
	mutex_unlock(&bdr_lock);
	if (r)
		return r;
	if (taken) {
		*error = "meta_device is in use by another bdr target";
		return ERR_PTR(-EBUSY);
	}

	if (bdr_dev_name_taken(geo->name)) {
		*error = "Invalid chardev_name: /dev/<chardev_name> already exists";
		return ERR_PTR(-EEXIST);
	}
	fresh = bdr_ring_alloc(geo, error);
	if (IS_ERR(fresh))
		return fresh;

	mutex_lock(&bdr_lock);
	r = bdr_ring_find(geo, error);	/* created meanwhile by another table? */
	if (r) {
		mutex_unlock(&bdr_lock);
		put_device(&fresh->dev);
		return r;
	}
	if (bdr_meta_taken(geo)) {
		mutex_unlock(&bdr_lock);
		put_device(&fresh->dev);
		*error = "meta_device is in use by another bdr target";
		return ERR_PTR(-EBUSY);
	}
	cdev_init(&fresh->cdev, &bdr_fops);
	fresh->cdev.owner = THIS_MODULE;
	ret = cdev_device_add(&fresh->cdev, &fresh->dev);
	if (ret) {
		mutex_unlock(&bdr_lock);
		*error = "Cannot register the character device";
		put_device(&fresh->dev);
		return ERR_PTR(ret);
	}
	fresh->registered = true;
	fresh->targets = 1;
	list_add(&fresh->node, &bdr_rings);
	mutex_unlock(&bdr_lock);
	return fresh;
}

static void bdr_ring_put_target(struct bdr_ring *r)
{
	unsigned long irqflags;

	mutex_lock(&bdr_lock);
	if (--r->targets == 0) {
		list_del_init(&r->node);
		spin_lock_irqsave(&r->lock, irqflags);
		WRITE_ONCE(r->dead, true);
		bdr_set_state(r, r->state | BDR_STATE_DEAD);
		spin_unlock_irqrestore(&r->lock, irqflags);
		wake_up_all(&r->wq);
		if (r->meta) {
			/*
			 * Finish the metadata writes due; the devices are released
			 * after us.  Nothing queues work once dying is set, and the
			 * worker stops at its next pass.
			 */
			flush_work(&r->meta->work);
			spin_lock_irqsave(&r->meta->lock, irqflags);
			r->meta->dying = true;
			spin_unlock_irqrestore(&r->meta->lock, irqflags);
			flush_work(&r->meta->work);
		}
		cdev_device_del(&r->cdev, &r->dev);
		r->registered = false;
	}
	mutex_unlock(&bdr_lock);
	put_device(&r->dev);
}

/* ---------------------------------------------------------------------- */
/* Character device                                                        */

static int bdr_open(struct inode *inode, struct file *file)
{
	struct bdr_ring *r = container_of(inode->i_cdev, struct bdr_ring, cdev);

	/* One consumer: the only file that may write tail or take the bitmap. */
	if ((file->f_mode & FMODE_WRITE) && atomic_cmpxchg(&r->writers, 0, 1) != 0)
		return -EBUSY;
	/* chrdev_open holds the cdev, whose parent is r->dev: r is alive. */
	get_device(&r->dev);
	file->private_data = r;
	return 0;
}

static int bdr_release(struct inode *inode, struct file *file)
{
	struct bdr_ring *r = file->private_data;

	if (file->f_mode & FMODE_WRITE)
		atomic_set(&r->writers, 0);
	put_device(&r->dev);
	return 0;
}

static int bdr_mmap(struct file *file, struct vm_area_struct *vma)
{
	struct bdr_ring *r = file->private_data;

	/* MAP_SHARED; a read-only file's shared mapping has only VM_MAYSHARE. */
	if (!(vma->vm_flags & VM_MAYSHARE))
		return -EINVAL;
	return remap_vmalloc_range(vma, r->mem, vma->vm_pgoff);
}

static __poll_t bdr_poll(struct file *file, poll_table *wait)
{
	struct bdr_ring *r = file->private_data;
	__poll_t mask = 0;
	u64 head, tail, seen;

	poll_wait(file, &r->wq, wait);
	/*
	 * Pairs with the barrier in bdr_wake()'s wq_has_sleeper(): either the
	 * producer sees us on the queue, or we see its new head and state.
	 */
	smp_mb();
	head = READ_ONCE(r->head);
	tail = READ_ONCE(r->ctl->tail);
	seen = READ_ONCE(r->ctl->seen);
	/* The consumer's read position: seen if it lies in [tail, head]. */
	if (seen - tail > head - tail)
		seen = tail;
	if (head != seen ||
	    (READ_ONCE(r->state) & (BDR_STATE_OVERFLOW | BDR_STATE_DIRTY)))
		mask |= EPOLLIN | EPOLLRDNORM;
	if (READ_ONCE(r->dead))
		mask |= EPOLLHUP;
	return mask;
}

static long bdr_ioctl_info(struct bdr_ring *r, void __user *arg)
{
	struct bdr_info info = {
		.magic = BDR_MAGIC,
		.abi_version = BDR_ABI_VERSION,
		.nr_slots = r->nr_slots,
		.slot_data = BDR_SLOT_DATA,
		.desc_offset = r->desc_offset,
		.data_offset = r->data_offset,
		.mmap_size = r->mem_size,
		.dev_sectors = r->dev_sectors,
		.region_sectors = 1U << r->region_shift,
		.nr_regions = r->nr_regions,
		.bitmap_bytes = r->bitmap_bytes,
		.instance = r->instance,
	};

	strscpy(info.name, r->name, sizeof(info.name));
	return copy_to_user(arg, &info, sizeof(info)) ? -EFAULT : 0;
}

static void bdr_snapshot(struct bdr_ring *r, struct bdr_status *st)
{
	unsigned long irqflags;

	spin_lock_irqsave(&r->lock, irqflags);
	st->head = r->head;
	st->tail = bdr_consumer_tail(r);
	st->next_seq = r->head;
	st->state = r->state;
	st->records = r->records;
	st->bytes = r->bytes;
	st->dropped = r->dropped;
	st->failed = r->failed;
	st->overflows = r->overflows;
	spin_unlock_irqrestore(&r->lock, irqflags);
	/* Racy count, fine for reporting: bits only get set until a take. */
	st->dirty_regions = bitmap_weight(r->bitmap, r->nr_regions);
}

/* Every slot reserved before pos is published. */
static bool bdr_published(struct bdr_ring *r, u64 pos)
{
	return (s64)(READ_ONCE(r->head) - pos) >= 0;
}

/* Give taken regions back to the active bitmap: nothing may be lost. */
static void bdr_untake(struct bdr_ring *r, unsigned long *taken)
{
	unsigned long irqflags;

	spin_lock_irqsave(&r->lock, irqflags);
	bitmap_or(r->bitmap, r->bitmap, taken, r->nr_regions);
	bdr_set_state(r, r->state | BDR_STATE_DIRTY);
	spin_unlock_irqrestore(&r->lock, irqflags);
	bdr_wake(r);	/* a poller may have gone to sleep on the cleared state */
}

static long bdr_ioctl_take_dirty(struct bdr_ring *r, struct file *file, void __user *arg)
{
	struct bdr_dirty d;
	unsigned long irqflags;
	unsigned long *taken;
	long ret = 0;
	u64 pos;

	if (!(file->f_mode & FMODE_WRITE))
		return -EBADF;	/* only the consumer takes the bitmap */
	if (copy_from_user(&d, arg, sizeof(d)))
		return -EFAULT;
	if (d.bitmap_bytes < r->bitmap_bytes)
		return -EINVAL;

	mutex_lock(&r->take_lock);
	spin_lock_irqsave(&r->lock, irqflags);
	taken = r->bitmap;
	r->bitmap = r->spare;		/* zeroed */
	d.state = r->state;
	/* Writes that reserved slots before the handover count as before it. */
	pos = r->reserve;
	bdr_set_state(r, r->state & ~(BDR_STATE_OVERFLOW | BDR_STATE_DIRTY | BDR_STATE_RECOVERED));
	spin_unlock_irqrestore(&r->lock, irqflags);

	/* ... and are published before the handover returns (bdr_uapi.h). */
	if (wait_event_killable(r->wq, bdr_published(r, pos))) {
		bdr_untake(r, taken);
		ret = -EINTR;
		goto out;
	}
	d.ring_head = pos;
	d.next_seq = pos;
	d.nr_dirty = bitmap_weight(taken, r->nr_regions);
	if (copy_to_user(u64_to_user_ptr(d.bitmap), taken, r->bitmap_bytes) ||
	    copy_to_user(arg, &d, sizeof(d))) {
		bdr_untake(r, taken);
		ret = -EFAULT;
	}
out:
	bitmap_zero(taken, r->nr_regions);
	r->spare = taken;
	mutex_unlock(&r->take_lock);
	return ret;
}

static long bdr_ioctl_track_info(struct bdr_ring *r, void __user *arg)
{
	struct bdr_meta *m = r->meta;
	struct bdr_track t = {};
	unsigned long irqflags;

	if (m) {
		spin_lock_irqsave(&m->lock, irqflags);
		t.flags = BDR_TRACK_ENABLED | (m->recovered ? BDR_TRACK_RECOVERED : 0) |
			  (m->error ? BDR_TRACK_FAILED : 0);
		memcpy(t.clear_ring, m->clear_ring, sizeof(t.clear_ring));
		t.clear_pos = m->clear_pos;
		t.clear_generation = m->clear_generation;
		t.loaded_regions = m->loaded;
		t.meta_writes = m->meta_writes;
		t.clears = m->clears;
		spin_unlock_irqrestore(&m->lock, irqflags);
		t.marked_regions = bitmap_weight(m->bits, r->nr_regions);	/* racy, for reporting */
	}
	return copy_to_user(arg, &t, sizeof(t)) ? -EFAULT : 0;
}

static bool bdr_block_marked(struct bdr_meta *m, u32 nr)
{
	u32 start = nr * BDR_META_BITS;

	return find_next_bit(m->bits, start + BDR_META_BITS, start) < start + BDR_META_BITS;
}

/* The argument of a TRACK_CLEAR or TRACK_ROTATE, from a writer of a ring with a meta_device. */
static long bdr_track_arg(struct bdr_ring *r, struct file *file, void __user *arg,
			  struct bdr_track_clear *c)
{
	if (!r->meta)
		return -EOPNOTSUPP;
	if (!(file->f_mode & FMODE_WRITE))
		return -EBADF;
	if (copy_from_user(c, arg, sizeof(*c)))
		return -EFAULT;
	return 0;
}

/* Under the meta lock and the ring lock: may the marks change at all? */
static long bdr_track_usable(struct bdr_ring *r)
{
	if (r->dead || r->meta->dying)
		return -ENODEV;
	if (r->meta->error)
		return -EIO;
	return 0;
}

static long bdr_ioctl_track_clear(struct bdr_ring *r, struct file *file, void __user *arg)
{
	struct bdr_meta *m = r->meta;
	struct bdr_track_clear c;
	unsigned long irqflags;
	bool empty;
	long ret;
	u32 nr;

	ret = bdr_track_arg(r, file, arg, &c);
	if (ret)
		return ret;

	spin_lock_irqsave(&m->lock, irqflags);
	spin_lock(&r->lock);
	ret = bdr_track_usable(r);
	if (!ret && (m->writes || r->head != c.pos || r->reserve != r->head ||
		     (r->state & (BDR_STATE_OVERFLOW | BDR_STATE_DIRTY | BDR_STATE_RECOVERED))))
		ret = -EBUSY;
	spin_unlock(&r->lock);
	if (!ret) {
		empty = bitmap_empty(m->bits, m->nr_blocks * BDR_META_BITS);
		/* Nothing marked since a clear of this ring: the older point still holds. */
		if (!empty || memcmp(m->clear_ring, c.ring, sizeof(c.ring)) ||
		    m->clear_generation != c.generation) {
			for (nr = 0; nr < m->nr_blocks; nr++)
				if (bdr_block_marked(m, nr))
					__set_bit(nr, m->dirty_blocks);
			bitmap_zero(m->bits, m->nr_blocks * BDR_META_BITS);
			bitmap_zero(m->durable, m->nr_blocks * BDR_META_BITS);
			bitmap_zero(m->epoch[0], m->nr_blocks * BDR_META_BITS);
			bitmap_zero(m->epoch[1], m->nr_blocks * BDR_META_BITS);
			m->epoch_start = c.pos;
			memcpy(m->clear_ring, c.ring, sizeof(m->clear_ring));
			m->clear_pos = c.pos;
			m->clear_generation = c.generation;
			m->header_dirty = true;
			m->clears++;
			/* Under the lock: once the last table is dying, nothing is queued. */
			queue_work(bdr_meta_wq, &m->work);
		}
	}
	spin_unlock_irqrestore(&m->lock, irqflags);
	return ret;
}

/*
 * Clear the marks of the regions not written in the current epoch, once
 * every write of the earlier epochs is acknowledged durable on the replica:
 * no write mapped in the previous epoch is before end_io, and the client
 * released the ring up to the current epoch's start (pos, its tail).  The
 * marks kept then cover every write after that start, which becomes the
 * clear point; a new epoch begins at the ring's reserve position.
 */
static long bdr_ioctl_track_rotate(struct bdr_ring *r, struct file *file, void __user *arg)
{
	struct bdr_meta *m = r->meta;
	struct bdr_track_clear c;
	size_t w, words = BDR_META_BLOCK / sizeof(unsigned long);
	unsigned long *keep, irqflags;
	unsigned int prev;
	long ret;
	u32 nr;

	ret = bdr_track_arg(r, file, arg, &c);
	if (ret)
		return ret;

	spin_lock_irqsave(&m->lock, irqflags);
	spin_lock(&r->lock);
	prev = m->cur ^ 1;
	ret = bdr_track_usable(r);
	if (!ret && (m->epoch_writes[prev] || c.pos < m->epoch_start || c.pos > bdr_consumer_tail(r) ||
		     (r->state & (BDR_STATE_OVERFLOW | BDR_STATE_DIRTY | BDR_STATE_RECOVERED))))
		ret = -EBUSY;
	if (!ret) {
		keep = m->epoch[m->cur];
		for (nr = 0; nr < m->nr_blocks; nr++) {
			bool changed = false;

			for (w = (size_t)nr * words; w < (size_t)(nr + 1) * words; w++) {
				if (m->bits[w] & ~keep[w]) {
					m->bits[w] &= keep[w];
					changed = true;
				}
				m->durable[w] &= keep[w];
			}
			if (changed)
				__set_bit(nr, m->dirty_blocks);
		}
		memcpy(m->clear_ring, c.ring, sizeof(m->clear_ring));
		m->clear_pos = m->epoch_start;
		m->clear_generation = c.generation;
		m->header_dirty = true;
		m->clears++;
		m->rotations++;
		bitmap_zero(m->epoch[prev], m->nr_blocks * BDR_META_BITS);
		m->cur = prev;
		m->epoch_start = r->reserve;
		/* Under the lock: once the last table is dying, nothing is queued. */
		queue_work(bdr_meta_wq, &m->work);
	}
	spin_unlock(&r->lock);
	spin_unlock_irqrestore(&m->lock, irqflags);
	return ret;
}

static long bdr_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct bdr_ring *r = file->private_data;
	void __user *uarg = (void __user *)arg;
	struct bdr_status st = {};

	switch (cmd) {
	case BDR_IOC_INFO:
		return bdr_ioctl_info(r, uarg);
	case BDR_IOC_STATUS:
		bdr_snapshot(r, &st);
		return copy_to_user(uarg, &st, sizeof(st)) ? -EFAULT : 0;
	case BDR_IOC_TAKE_DIRTY:
		return bdr_ioctl_take_dirty(r, file, uarg);
	case BDR_IOC_TRACK_INFO:
		return bdr_ioctl_track_info(r, uarg);
	case BDR_IOC_TRACK_ROTATE:
		return bdr_ioctl_track_rotate(r, file, uarg);
	case BDR_IOC_TRACK_CLEAR:
		return bdr_ioctl_track_clear(r, file, uarg);
	default:
		return -ENOTTY;
	}
}

static const struct file_operations bdr_fops = {
	.owner = THIS_MODULE,
	.open = bdr_open,
	.release = bdr_release,
	.mmap = bdr_mmap,
	.poll = bdr_poll,
	.unlocked_ioctl = bdr_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.llseek = noop_llseek,
};

/* ---------------------------------------------------------------------- */
/* Overlap tracking                                                        */

static bool bdr_overlaps(struct list_head *list, struct bdr_io *io)
{
	struct bdr_io *o;

	list_for_each_entry(o, list, list)
		if (o->start < io->end && io->start < o->end)
			return true;
	return false;
}

static void bdr_submit_work(struct work_struct *work)
{
	struct bdr_c *bc = container_of(work, struct bdr_c, submit_work);
	struct bdr_io *io;

	/* Move one io at a time so that it is always on a list new bios check. */
	for (;;) {
		spin_lock_irq(&bc->io_lock);
		io = list_first_entry_or_null(&bc->ready, struct bdr_io, list);
		if (io)
			list_move_tail(&io->list, &bc->inflight);
		spin_unlock_irq(&bc->io_lock);
		if (!io)
			break;
		dm_submit_bio_remap(dm_bio_from_per_bio_data(io, sizeof(*io)), NULL);
	}
}

/*
 * Remove a completed io and release the waiters it no longer blocks, in
 * arrival order: a waiter also waits for earlier waiters it overlaps.
 */
static void bdr_io_done(struct bdr_c *bc, struct bdr_io *io)
{
	struct bdr_io *w, *tmp;
	unsigned long irqflags;
	bool kick = false;
	LIST_HEAD(blocked);

	spin_lock_irqsave(&bc->io_lock, irqflags);
	list_del(&io->list);
	list_for_each_entry_safe(w, tmp, &bc->waiting, list) {
		if (bdr_overlaps(&bc->inflight, w) || bdr_overlaps(&bc->ready, w) ||
		    bdr_overlaps(&blocked, w)) {
			list_move_tail(&w->list, &blocked);
			continue;
		}
		list_move_tail(&w->list, &bc->ready);
		kick = true;
	}
	list_splice(&blocked, &bc->waiting);
	spin_unlock_irqrestore(&bc->io_lock, irqflags);
	if (kick)
		queue_work(bc->wq, &bc->submit_work);
}

/*
 * Track io for overlaps: true if it must wait (it is then submitted by
 * bdr_io_done), false if the caller submits it now.
 */
static bool bdr_admit(struct bdr_c *bc, struct bdr_io *io)
{
	unsigned long irqflags;
	bool wait;

	INIT_LIST_HEAD(&io->list);
	io->tracked = true;
	spin_lock_irqsave(&bc->io_lock, irqflags);
	wait = bdr_overlaps(&bc->inflight, io) || bdr_overlaps(&bc->waiting, io) ||
	       bdr_overlaps(&bc->ready, io);
	list_add_tail(&io->list, wait ? &bc->waiting : &bc->inflight);
	spin_unlock_irqrestore(&bc->io_lock, irqflags);
	return wait;
}

/* ---------------------------------------------------------------------- */
/* Persistent change tracking: the I/O path                                */

enum bdr_meta_verdict { BDR_META_MARKED, BDR_META_WAIT, BDR_META_FAILED };

/*
 * Count io as a write in flight, and let it go on if its regions are marked
 * on the meta device; otherwise mark them and queue it for the worker.
 */
static enum bdr_meta_verdict bdr_meta_map(struct bdr_meta *m, struct bdr_io *io)
{
	struct bdr_ring *r = m->ring;
	enum bdr_meta_verdict v = BDR_META_MARKED;
	unsigned long irqflags;
	u32 first, last, b;

	spin_lock_irqsave(&m->lock, irqflags);
	if (unlikely(m->error)) {
		spin_unlock_irqrestore(&m->lock, irqflags);
		return BDR_META_FAILED;
	}
	m->writes++;
	io->meta_counted = true;
	io->meta_epoch = m->cur;
	m->epoch_writes[m->cur]++;
	if (!bdr_regions(r, io->start, io->end, &first, &last)) {
		spin_unlock_irqrestore(&m->lock, irqflags);
		return v;
	}
	bitmap_set(m->epoch[m->cur], first, last - first + 1);
	if (find_next_zero_bit(m->durable, last + 1, first) <= last) {
		bitmap_set(m->bits, first, last - first + 1);
		for (b = first / BDR_META_BITS; b <= last / BDR_META_BITS; b++)
			__set_bit(b, m->dirty_blocks);
		list_add_tail(&io->list, &m->waiting);
		queue_work(bdr_meta_wq, &m->work);
		v = BDR_META_WAIT;
	}
	spin_unlock_irqrestore(&m->lock, irqflags);
	return v;
}

/*
 * A counted write completed (and reserved its slots, or went to the bitmap):
 * its regions belong to the epoch it ends in too, which may be later than
 * the one it was mapped in.
 */
static void bdr_meta_end(struct bdr_meta *m, struct bdr_io *io)
{
	unsigned long irqflags;
	u32 first, last;

	spin_lock_irqsave(&m->lock, irqflags);
	m->writes--;
	m->epoch_writes[io->meta_epoch]--;
	if (bdr_regions(m->ring, io->start, io->end, &first, &last))
		bitmap_set(m->epoch[m->cur], first, last - first + 1);
	spin_unlock_irqrestore(&m->lock, irqflags);
}

#define BDR_META_RESTART	1	/* a clear came: its header goes first */

/* Write bitmap block nr from m->bits; then its marks are durable. */
static int bdr_meta_write_block(struct bdr_meta *m, u32 nr)
{
	unsigned long *disk = page_address(m->page);
	size_t w, words = BDR_META_BLOCK / sizeof(unsigned long);
	size_t base = (size_t)nr * words;
	unsigned long irqflags;
	int ret;

	spin_lock_irqsave(&m->lock, irqflags);
	if (m->header_dirty) {
		spin_unlock_irqrestore(&m->lock, irqflags);
		return BDR_META_RESTART;
	}
	__clear_bit(nr, m->dirty_blocks);
	bdr_meta_copy_block(m, nr);
	spin_unlock_irqrestore(&m->lock, irqflags);
	ret = bdr_meta_write(m, 1 + nr);
	if (ret)
		return ret;
	/*
	 * The device holds the copy now.  A mark cleared meanwhile stays
	 * cleared: only marks still set count as durable, and the clear's own
	 * write of this block comes after this one.
	 */
	spin_lock_irqsave(&m->lock, irqflags);
	for (w = 0; w < words; w++)
		m->durable[base + w] |= disk[w] & m->bits[base + w];
	spin_unlock_irqrestore(&m->lock, irqflags);
	return 0;
}

/* The one writer of the meta device: header, then dirty blocks, then release. */
static void bdr_meta_work(struct work_struct *work)
{
	struct bdr_meta *m = container_of(work, struct bdr_meta, work);
	struct bdr_ring *r = m->ring;
	struct bdr_io *io, *tmp;
	unsigned long irqflags;
	u32 nr, first, last;
	LIST_HEAD(go);
	u64 cp, cg;
	bool header;
	u8 ci[16];
	int ret;

	for (;;) {
		ret = 0;
		spin_lock_irqsave(&m->lock, irqflags);
		if (m->error || m->dying) {
			list_splice_init(&m->waiting, &go);
			spin_unlock_irqrestore(&m->lock, irqflags);
			break;
		}
		header = m->header_dirty;
		m->header_dirty = false;
		memcpy(ci, m->clear_ring, sizeof(ci));
		cp = m->clear_pos;
		cg = m->clear_generation;
		if (!header && bitmap_empty(m->dirty_blocks, m->nr_blocks)) {
			spin_unlock_irqrestore(&m->lock, irqflags);
			return;
		}
		spin_unlock_irqrestore(&m->lock, irqflags);

		/*
		 * A clear: the writes it covers completed, perhaps only into
		 * <device>'s volatile cache; they must be on the disk before
		 * their marks go.
		 */
		if (header)
			ret = blkdev_issue_flush(m->data);
		if (header && !ret)
			ret = bdr_meta_write_header(m, ci, cp, cg);
		for (nr = 0; !ret && nr < m->nr_blocks; nr++)
			if (test_bit(nr, m->dirty_blocks))
				ret = bdr_meta_write_block(m, nr);
		if (ret == BDR_META_RESTART)
			ret = 0;

		spin_lock_irqsave(&m->lock, irqflags);
		if (ret) {
			m->error = ret;
			list_splice_init(&m->waiting, &go);
			spin_unlock_irqrestore(&m->lock, irqflags);
			DMERR("%s: a write to the meta_device failed (%d): change tracking stopped, writes to the device fail",
			      m->ring->name, ret);
			break;
		}
		/* Whatever waits for marks that are durable now goes on. */
		list_for_each_entry_safe(io, tmp, &m->waiting, list)
			if (!bdr_regions(r, io->start, io->end, &first, &last) ||
			    find_next_zero_bit(m->durable, last + 1, first) > last)
				list_move_tail(&io->list, &go);
		spin_unlock_irqrestore(&m->lock, irqflags);

		list_for_each_entry_safe(io, tmp, &go, list) {
			list_del(&io->list);
			if (!bdr_admit(io->bc, io))
				dm_submit_bio_remap(dm_bio_from_per_bio_data(io, sizeof(*io)), NULL);
		}
	}
	/* Tracking failed or the target is gone: fail what waits. */
	list_for_each_entry_safe(io, tmp, &go, list) {
		struct bio *bio = dm_bio_from_per_bio_data(io, sizeof(*io));

		list_del(&io->list);
		bio->bi_status = BLK_STS_IOERR;
		bio_endio(bio);
	}
}

/* ---------------------------------------------------------------------- */
/* Target                                                                  */

static bool bdr_valid_name(const char *name)
{
	size_t len = strlen(name);
	size_t i;

	if (!len || len >= BDR_NAME_MAX || !strcmp(name, ".") || !strcmp(name, ".."))
		return false;
	for (i = 0; i < len; i++)
		if (!isalnum(name[i]) && !strchr("_-.", name[i]))
			return false;
	return true;
}

/* The next argument as a number in [min, max] (kstrtouint: no wrap-around). */
static int bdr_read_uint(struct dm_arg_set *as, unsigned int min, unsigned int max,
			 unsigned int *value)
{
	const char *arg = dm_shift_arg(as);

	if (!arg || kstrtouint(arg, 10, value) || *value < min || *value > max)
		return -EINVAL;
	return 0;
}

static int bdr_read_region(struct dm_arg_set *as, u32 *region_sectors, char **error)
{
	if (bdr_read_uint(as, 8, BDR_MAX_REGION_SECTORS, region_sectors) ||
	    !is_power_of_2(*region_sectors)) {
		*error = "Invalid region_sectors: a power of two from 8 to 16777216";
		return -EINVAL;
	}
	return 0;
}

#define BDR_USAGE "<device> <chardev_name> <buffer_size_in_writes> [<#feature_args> [region_sectors <n>] [meta_device <dev>]]"

/* [<#feature_args> [region_sectors <n>] [meta_device <dev>]], or the older form: [<region_sectors>] */
static int bdr_parse_features(struct dm_arg_set *as, u32 *region_sectors, const char **meta,
			      char **error)
{
	unsigned int nr;
	const char *key;

	if (!as->argc)
		return 0;
	if (as->argc == 1) {
		if (!strcmp(as->argv[0], "0"))
			return 0;
		return bdr_read_region(as, region_sectors, error);
	}
	if (bdr_read_uint(as, 1, 4, &nr) || nr != as->argc) {
		*error = "Invalid argument count: " BDR_USAGE;
		return -EINVAL;
	}
	while (as->argc) {
		key = dm_shift_arg(as);
		if (strcasecmp(key, "region_sectors") && strcasecmp(key, "meta_device")) {
			*error = "Unrecognised feature argument: expected region_sectors <n> or meta_device <dev>";
			return -EINVAL;
		}
		if (!as->argc) {
			*error = "Invalid argument count: a feature argument takes a value";
			return -EINVAL;
		}
		if (!strcasecmp(key, "meta_device"))
			*meta = dm_shift_arg(as);
		else if (bdr_read_region(as, region_sectors, error))
			return -EINVAL;
	}
	return 0;
}

/*
 * Construct a bdr mapping (docs/dm-bdr.md):
 *
 *   <device> <chardev_name> <buffer_size_in_writes> [<#feature_args> [<feature>...]]
 *
 * device:                the device to replicate, mapped 1:1 from sector 0;
 *                        bdr is the only target of its table
 * chardev_name:          /dev/<chardev_name> gives the client the ring; a
 *                        name that exists in /dev is refused
 * buffer_size_in_writes: ring slots, one 4 KiB write each
 *                        (BDR_SLOT_DATA + sizeof(struct bdr_record) bytes),
 *                        1 to 16777216 and at most a quarter of the memory
 * features:
 *   region_sectors <n>   dirty bitmap granularity, a power of two from 8 to
 *                        2^24 (default BDR_DEFAULT_REGION_SECTORS); grown to
 *                        the smallest power of two that covers the device in
 *                        at most BDR_MAX_REGIONS regions
 *   meta_device <dev>    persistent change tracking on <dev> (bdr_uapi.h)
 *
 * A fourth argument alone is the region size (the older form of the line).
 * I/O is split at min(buffer_size_in_writes, 256) slots, so that every bio
 * fits in the ring.
 */
static int bdr_ctr(struct dm_target *ti, unsigned int argc, char **argv)
{
	struct dm_arg_set as = { .argc = argc, .argv = argv };
	struct bdr_geometry geo = { .region_sectors = BDR_DEFAULT_REGION_SECTORS };
	const char *meta = NULL;
	u32 asked_region;
	const char *device;
	u64 ring_bytes;
	struct bdr_c *bc;
	struct bdr_ring *r;
	int ret;

	if (argc < 3) {
		ti->error = "Invalid argument count: " BDR_USAGE;
		return -EINVAL;
	}
	if (ti->begin) {
		ti->error = "bdr must map its table from sector 0";
		return -EINVAL;
	}
	device = dm_shift_arg(&as);
	geo.name = dm_shift_arg(&as);
	if (!bdr_valid_name(geo.name)) {
		ti->error = "Invalid chardev_name: 1-31 characters of [A-Za-z0-9_.-]";
		return -EINVAL;
	}
	if (bdr_read_uint(&as, 1, BDR_MAX_SLOTS, &geo.nr_slots)) {
		ti->error = "Invalid buffer_size_in_writes: a number from 1 to 16777216";
		return -EINVAL;
	}
	/* Refuse a ring larger than a quarter of RAM rather than fail vmalloc. */
	ring_bytes = (u64)geo.nr_slots * (BDR_SLOT_DATA + sizeof(struct bdr_record));
	if (ring_bytes > ((u64)totalram_pages() << PAGE_SHIFT) / 4) {
		ti->error = "buffer_size_in_writes needs more than a quarter of the memory";
		return -ENOMEM;
	}
	ret = bdr_parse_features(&as, &geo.region_sectors, &meta, &ti->error);
	if (ret)
		return ret;
	asked_region = geo.region_sectors;
	while (DIV_ROUND_UP_ULL(ti->len, geo.region_sectors) > BDR_MAX_REGIONS) {
		if (geo.region_sectors >= BDR_MAX_REGION_SECTORS) {
			ti->error = "Device too large for the dirty bitmap";
			return -EINVAL;
		}
		geo.region_sectors <<= 1;
	}
	if (geo.region_sectors != asked_region)
		DMINFO("%s: region_sectors %u -> %u, so that %llu sectors fit in at most %u regions",
		       geo.name, asked_region, geo.region_sectors,
		       (unsigned long long)ti->len, BDR_MAX_REGIONS);
	geo.dev_sectors = ti->len;
	geo.md = dm_table_get_md(ti->table);

	bc = kzalloc(sizeof(*bc), GFP_KERNEL);
	if (!bc) {
		ti->error = "Cannot allocate target context";
		return -ENOMEM;
	}
	spin_lock_init(&bc->io_lock);
	INIT_LIST_HEAD(&bc->inflight);
	INIT_LIST_HEAD(&bc->waiting);
	INIT_LIST_HEAD(&bc->ready);
	INIT_WORK(&bc->submit_work, bdr_submit_work);

	ret = dm_get_device(ti, device, dm_table_get_mode(ti->table), &bc->dev);
	if (ret) {
		ti->error = "Device lookup failed";
		goto free_bc;
	}
	geo.lower = bc->dev->bdev->bd_dev;
	geo.lower_bdev = bc->dev->bdev;
	if (meta) {
		ret = dm_get_device(ti, meta, dm_table_get_mode(ti->table), &bc->meta_dev);
		if (ret) {
			ti->error = "meta_device lookup failed";
			goto put_dev;
		}
		if (bc->meta_dev->bdev->bd_dev == geo.lower) {
			ti->error = "meta_device must be another device than <device>";
			ret = -EINVAL;
			goto put_dev;
		}
		geo.meta_bdev = bc->meta_dev->bdev;
	}

	ret = dm_set_target_max_io_len(ti, (sector_t)min(geo.nr_slots, 256U) * BDR_SLOT_SECTORS);
	if (ret) {
		ti->error = "Cannot set the maximum I/O length";
		goto put_dev;
	}

	bc->wq = alloc_workqueue("bdr_%s", WQ_MEM_RECLAIM | WQ_UNBOUND, 1, geo.name);
	if (!bc->wq) {
		ti->error = "Cannot allocate workqueue";
		ret = -ENOMEM;
		goto put_dev;
	}

	r = bdr_ring_get(&geo, &ti->error);
	if (IS_ERR(r)) {
		ret = PTR_ERR(r);
		goto destroy_wq;
	}
	bc->ring = r;

	ti->private = bc;
	ti->num_flush_bios = 1;
	ti->flush_supported = true;
	ti->num_discard_bios = 1;
	ti->num_write_zeroes_bios = 1;
	ti->per_io_data_size = sizeof(struct bdr_io);
	return 0;

destroy_wq:
	destroy_workqueue(bc->wq);
put_dev:
	if (bc->meta_dev)
		dm_put_device(ti, bc->meta_dev);
	dm_put_device(ti, bc->dev);
free_bc:
	kfree(bc);
	return ret;
}

static void bdr_dtr(struct dm_target *ti)
{
	struct bdr_c *bc = ti->private;

	/* dm drained all I/O (deferred copies included); the queue may still hold a finished kick. */
	destroy_workqueue(bc->wq);
	WARN_ON_ONCE(!list_empty(&bc->inflight) || !list_empty(&bc->waiting));
	bdr_ring_put_target(bc->ring);
	if (bc->meta_dev)
		dm_put_device(ti, bc->meta_dev);
	dm_put_device(ti, bc->dev);
	kfree(bc);
}

/* The record a bio becomes once it completed, 0 for none. */
static u16 bdr_record_op(struct bio *bio)
{
	switch (bio_op(bio)) {
	case REQ_OP_WRITE:
		return bio_sectors(bio) ? BDR_OP_WRITE : BDR_OP_FLUSH;
	case REQ_OP_DISCARD:
		return BDR_OP_DISCARD;
	case REQ_OP_WRITE_ZEROES:
		return BDR_OP_WRITE_ZEROES;
	default:
		return 0;
	}
}

static int bdr_map(struct dm_target *ti, struct bio *bio)
{
	struct bdr_c *bc = ti->private;
	struct bdr_io *io = dm_per_bio_data(bio, sizeof(*io));

	bio_set_dev(bio, bc->dev->bdev);
	if (bio_sectors(bio) || op_is_zone_mgmt(bio_op(bio)))
		bio->bi_iter.bi_sector = dm_target_offset(ti, bio->bi_iter.bi_sector);

	io->bc = bc;
	io->tracked = false;
	io->copied = false;
	io->meta_counted = false;
	io->iter = bio->bi_iter;
	io->start = bio->bi_iter.bi_sector;
	io->end = bio_end_sector(bio);
	io->op = bdr_record_op(bio);
	/*
	 * Read the flags now: the block layer clears REQ_FUA on the clone when
	 * the lower device has no volatile cache, and the record must still
	 * say that the source asked for a durability point.
	 */
	io->flags = io->op == BDR_OP_WRITE && (bio->bi_opf & REQ_FUA) ? BDR_REC_FUA : 0;
	if (!io->op || io->op == BDR_OP_FLUSH)
		return DM_MAPIO_REMAPPED;

	if (bc->ring->meta) {
		switch (bdr_meta_map(bc->ring->meta, io)) {
		case BDR_META_FAILED:
			return DM_MAPIO_KILL;
		case BDR_META_WAIT:
			return DM_MAPIO_SUBMITTED;
		case BDR_META_MARKED:
			break;
		}
	}
	return bdr_admit(bc, io) ? DM_MAPIO_SUBMITTED : DM_MAPIO_REMAPPED;
}

static int bdr_end_io(struct dm_target *ti, struct bio *bio, blk_status_t *error)
{
	struct bdr_c *bc = ti->private;
	struct bdr_io *io = dm_per_bio_data(bio, sizeof(*io));
	struct bdr_ring *r = bc->ring;
	bool defer;

	if (io->copied || !io->op)
		return DM_ENDIO_DONE;
	if (bdr_reserve(r, io, *error) == BDR_NOT_PUBLISHED) {
		if (io->meta_counted)
			bdr_meta_end(r->meta, io);
		if (io->tracked)
			bdr_io_done(bc, io);
		return DM_ENDIO_DONE;
	}
	/* Reserved before it stops counting: a clear then sees it in the ring. */
	if (io->meta_counted)
		bdr_meta_end(r->meta, io);
	/* Reserved: a write that overlaps this one now comes after it in the ring. */
	if (io->tracked)
		bdr_io_done(bc, io);
	defer = io->op == BDR_OP_WRITE &&
		io->iter.bi_size > BDR_INLINE_SLOTS * BDR_SLOT_DATA;
	if (defer) {
		/* bdr_copy_work() ends the bio again once its data is in the ring. */
		INIT_WORK(&io->copy_work, bdr_copy_work);
		queue_work(bdr_copy_wq, &io->copy_work);
		return DM_ENDIO_INCOMPLETE;
	}
	bdr_fill(r, bio, io);
	bdr_complete(r, io);
	return DM_ENDIO_DONE;
}

static const char *bdr_state_name(u64 state)
{
	if (state & BDR_STATE_OVERFLOW)
		return "overflow";
	if (state & BDR_STATE_DIRTY)
		return "dirty";
	return "capturing";
}

static void bdr_status(struct dm_target *ti, status_type_t type,
		       unsigned int status_flags, char *result, unsigned int maxlen)
{
	struct bdr_c *bc = ti->private;
	struct bdr_ring *r = bc->ring;
	struct bdr_status st;
	unsigned int sz = 0;

	switch (type) {
	case STATUSTYPE_INFO:
		bdr_snapshot(r, &st);
		DMEMIT("state=%s fill=%llu/%u records=%llu bytes=%llu dropped=%llu failed=%llu dirty_regions=%llu overflows=%llu next_seq=%llu",
		       bdr_state_name(st.state), st.head - st.tail, r->nr_slots,
		       st.records, st.bytes, st.dropped, st.failed,
		       st.dirty_regions, st.overflows, st.next_seq);
		if (r->meta)
			DMEMIT(" tracked_regions=%u meta_writes=%llu meta_failed=%d meta_rotations=%llu",
			       (unsigned int)bitmap_weight(r->meta->bits, r->nr_regions),
			       READ_ONCE(r->meta->meta_writes), READ_ONCE(r->meta->error) ? 1 : 0,
			       READ_ONCE(r->meta->rotations));
		break;
	case STATUSTYPE_TABLE:
		DMEMIT("%s %s %u %d region_sectors %u", bc->dev->name, r->name, r->nr_slots,
		       bc->meta_dev ? 4 : 2, 1U << r->region_shift);
		if (bc->meta_dev)
			DMEMIT(" meta_device %s", bc->meta_dev->name);
		break;
	case STATUSTYPE_IMA:
		DMEMIT_TARGET_NAME_VERSION(ti->type);
		DMEMIT(",device_name=%s,chardev_name=%s,buffer_size_in_writes=%u,region_sectors=%u",
		       bc->dev->name, r->name, r->nr_slots, 1U << r->region_shift);
		if (bc->meta_dev)
			DMEMIT(",meta_device=%s", bc->meta_dev->name);
		DMEMIT(";");
		break;
	}
}

static int bdr_iterate_devices(struct dm_target *ti,
			       iterate_devices_callout_fn fn, void *data)
{
	struct bdr_c *bc = ti->private;

	return fn(ti, bc->dev, 0, ti->len, data);
}

static void bdr_io_hints(struct dm_target *ti, struct queue_limits *limits)
{
	/* Pages must not change while written: the ring copy must equal the disk. */
	limits->features |= BLK_FEAT_STABLE_WRITES;
}

static struct target_type bdr_target = {
	.name = "bdr",
	.version = {1, 3, 0},
	.features = DM_TARGET_SINGLETON,
	.module = THIS_MODULE,
	.ctr = bdr_ctr,
	.dtr = bdr_dtr,
	.map = bdr_map,
	.end_io = bdr_end_io,
	.status = bdr_status,
	.iterate_devices = bdr_iterate_devices,
	.io_hints = bdr_io_hints,
};

static int __init dm_bdr_init(void)
{
	int ret;

	/* Copies of large bios: any CPU, and progress under memory pressure. */
	bdr_copy_wq = alloc_workqueue("bdr_copy", WQ_MEM_RECLAIM | WQ_UNBOUND | WQ_HIGHPRI, 0);
	if (!bdr_copy_wq)
		return -ENOMEM;
	/* Metadata writes: writes to the device wait for them. */
	bdr_meta_wq = alloc_workqueue("bdr_meta", WQ_MEM_RECLAIM | WQ_UNBOUND | WQ_HIGHPRI, 0);
	if (!bdr_meta_wq) {
		ret = -ENOMEM;
		goto destroy_wq;
	}
	ret = alloc_chrdev_region(&bdr_devt, 0, BDR_MINORS, "bdr");
	if (ret)
		goto destroy_meta_wq;
	ret = class_register(&bdr_class);
	if (ret)
		goto unregister_region;
	ret = dm_register_target(&bdr_target);
	if (ret)
		goto unregister_class;
	return 0;

unregister_class:
	class_unregister(&bdr_class);
unregister_region:
	unregister_chrdev_region(bdr_devt, BDR_MINORS);
destroy_meta_wq:
	destroy_workqueue(bdr_meta_wq);
destroy_wq:
	destroy_workqueue(bdr_copy_wq);
	return ret;
}

static void __exit dm_bdr_exit(void)
{
	dm_unregister_target(&bdr_target);
	class_unregister(&bdr_class);
	unregister_chrdev_region(bdr_devt, BDR_MINORS);
	ida_destroy(&bdr_minor_ida);
	destroy_workqueue(bdr_meta_wq);
	destroy_workqueue(bdr_copy_wq);
}

module_init(dm_bdr_init);
module_exit(dm_bdr_exit);

MODULE_DESCRIPTION(DM_NAME " target capturing writes for block device replication");
MODULE_LICENSE("GPL");
MODULE_ALIAS("dm-bdr");
