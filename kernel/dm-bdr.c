// SPDX-License-Identifier: GPL-2.0-only
/*
 * dm-bdr: the "bdr" device-mapper target of BDR, the block device replicator.
 *
 * The target passes all I/O straight to one underlying device and copies
 * every write that completed successfully into a ring shared with a
 * userspace client (mmap of /dev/<chardev_name>), which ships the writes to
 * a replica.  The ABI (ring layout, record format, ioctls) and its ordering
 * rules are described in bdr_uapi.h.
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
 *    held back until that one completed and was published.  Overlapping
 *    writes therefore reach the disk and the ring in the same order, and a
 *    replay of the ring equals the device.
 *  - Slots are copied under the ring lock, so records appear in the ring in
 *    completion order and head is published with release semantics.
 *
 * Lifetime: the ring (struct bdr_ring) embeds the struct device of the
 * chardev and is refcounted through it.  Targets (a table reload gives two
 * at once for the same mapped device), open files and thus mappings each
 * hold a reference; "dmsetup remove" with the chardev open or mapped only
 * marks the ring dead, the memory goes when the last file is closed.
 */

#include <linux/bio.h>
#include <linux/bitmap.h>
#include <linux/cdev.h>
#include <linux/ctype.h>
#include <linux/device-mapper.h>
#include <linux/fs.h>
#include <linux/idr.h>
#include <linux/init.h>
#include <linux/list.h>
#include <linux/mm.h>
#include <linux/module.h>
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
#define BDR_RESV_DONE		(1U << 31)

struct bdr_ring {
	struct device dev;		/* refcount of the whole ring */
	struct cdev cdev;
	struct list_head node;		/* in bdr_rings while targets use it */
	char name[BDR_NAME_MAX];
	struct mapped_device *md;	/* owner: only its tables may share */
	unsigned int targets;		/* targets using the ring, bdr_lock */
	bool registered;		/* chardev visible, bdr_lock */

	/* fixed geometry */
	u32 nr_slots;
	u32 region_shift;
	sector_t dev_sectors;
	u64 nr_regions;
	size_t bitmap_bytes;
	void *mem;			/* vmalloc_user: ctl | desc | data */
	size_t mem_size;
	struct bdr_ring_ctl *ctl;
	struct bdr_record *desc;
	u8 *data;

	/* producer state, under lock */
	spinlock_t lock;
	u64 head;			/* published: slots before it are complete */
	u64 reserve;			/* reserved: slots before it have an owner */
	u32 *resv;			/* per slot: length of the reservation
					 * starting there, | BDR_RESV_DONE once
					 * its slots are filled */
	u64 tail;			/* last tail validated from ctl */
	u64 next_seq;
	u64 state;
	unsigned long *bitmap;		/* dirty regions, active */
	u64 records, bytes, dropped, failed, overflows;
	bool dead;

	struct mutex take_lock;		/* serialises BDR_IOC_TAKE_DIRTY */
	unsigned long *spare;		/* zeroed bitmap swapped in by take */

	wait_queue_head_t wq;
};

struct bdr_target {
	struct dm_dev *dev;
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
	bool tracked;			/* on inflight or waiting */
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

static void bdr_mark_dirty(struct bdr_ring *r, sector_t start, sector_t end)
{
	u64 first, last;

	if (end <= start)
		return;
	first = start >> r->region_shift;
	last = (end - 1) >> r->region_shift;
	if (last >= r->nr_regions)
		last = r->nr_regions - 1;
	if (first > last)
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
	r->state = state;
	WRITE_ONCE(r->ctl->state, state);
}

static void bdr_fill_slot(struct bdr_ring *r, u64 pos, u16 op, u16 flags,
			  sector_t sector, u32 len)
{
	struct bdr_record *rec = &r->desc[pos % r->nr_slots];

	rec->seq = r->next_seq++;
	rec->sector = sector;
	rec->len = len;
	rec->op = op;
	rec->flags = flags;
	rec->reserved = 0;
}

/* Copy the clone's data into nslots consecutive slots starting at pos. */
static void bdr_copy_data(struct bdr_ring *r, struct bio *bio,
			  struct bdr_io *io, u64 pos)
{
	struct bvec_iter iter;
	struct bio_vec bv;
	u32 off = 0;		/* offset inside the current slot */

	__bio_for_each_segment(bv, bio, iter, io->iter) {
		u32 done = 0;

		while (done < bv.bv_len) {
			u8 *dst = r->data + (size_t)(pos % r->nr_slots) * BDR_SLOT_DATA + off;
			u32 n = min(bv.bv_len - done, BDR_SLOT_DATA - off);
			void *src = bvec_kmap_local(&bv);

			memcpy(dst, src + done, n);
			kunmap_local(src);
			done += n;
			off += n;
			if (off == BDR_SLOT_DATA) {
				off = 0;
				pos++;
			}
		}
	}
}

/* Move head over the reservations whose slots are filled.  Under r->lock. */
static void bdr_advance_head(struct bdr_ring *r)
{
	u64 head = r->head;

	while (head != r->reserve) {
		u32 *resv = &r->resv[head % r->nr_slots];

		if (!(*resv & BDR_RESV_DONE))
			break;
		head += *resv & ~BDR_RESV_DONE;
		*resv = 0;
	}
	if (head != r->head) {
		r->head = head;
		WRITE_ONCE(r->ctl->next_seq, r->next_seq);
		/* Slots before head are complete: pairs with the consumer's acquire. */
		smp_store_release(&r->ctl->head, head);
	}
}

/*
 * Publish the completed clone, or send it to the bitmap.  Called from end_io
 * (any context) with nothing held.  Descriptors are filled and slots reserved
 * under the lock, in completion order; the data is copied without the lock so
 * that completions on several CPUs copy in parallel, and head only moves over
 * reservations whose copy is done.
 */
static void bdr_publish(struct bdr_ring *r, struct bio *bio, struct bdr_io *io,
			blk_status_t status)
{
	u32 bytes = io->iter.bi_size;
	u16 op, flags = 0;
	unsigned long irqflags;
	u32 nslots, i;
	u64 pos;

	switch (bio_op(bio)) {
	case REQ_OP_WRITE:
		if (!bytes) {
			op = BDR_OP_FLUSH;
			nslots = 1;
		} else {
			op = BDR_OP_WRITE;
			nslots = DIV_ROUND_UP(bytes, BDR_SLOT_DATA);
			if (bio->bi_opf & REQ_FUA)
				flags |= BDR_REC_FUA;
		}
		break;
	case REQ_OP_DISCARD:
		op = BDR_OP_DISCARD;
		nslots = 1;
		break;
	case REQ_OP_WRITE_ZEROES:
		op = BDR_OP_WRITE_ZEROES;
		nslots = 1;
		break;
	default:
		return;
	}

	spin_lock_irqsave(&r->lock, irqflags);
	if (unlikely(status != BLK_STS_OK)) {
		/* The device may hold any part of it: resync the region. */
		r->failed++;
		bdr_mark_dirty(r, io->start, io->end);
		bdr_set_state(r, r->state);
		goto unlock;
	}
	if (r->state & BDR_STATE_OVERFLOW)
		goto drop;
	if (r->nr_slots - (r->reserve - bdr_consumer_tail(r)) < nslots) {
		r->overflows++;
		bdr_set_state(r, r->state | BDR_STATE_OVERFLOW);
		goto drop;
	}

	pos = r->reserve;
	r->reserve += nslots;
	r->records += nslots;
	if (op != BDR_OP_WRITE) {
		bdr_fill_slot(r, pos, op, flags, io->start,
			      op == BDR_OP_FLUSH ? 0 : bytes);
		r->resv[pos % r->nr_slots] = 1 | BDR_RESV_DONE;
		bdr_advance_head(r);
		goto unlock;
	}
	for (i = 0; i < nslots; i++) {
		u32 len = min_t(u32, bytes - i * BDR_SLOT_DATA, BDR_SLOT_DATA);
		u16 f = flags;

		if (i)
			f |= BDR_REC_CONT;
		if (i + 1 < nslots)
			f |= BDR_REC_MORE;
		bdr_fill_slot(r, pos + i, op, f,
			      io->start + ((sector_t)i << (PAGE_SHIFT - SECTOR_SHIFT)), len);
	}
	r->bytes += bytes;
	r->resv[pos % r->nr_slots] = nslots;
	spin_unlock_irqrestore(&r->lock, irqflags);

	/* The slots are ours: the consumer cannot see them before head moves. */
	bdr_copy_data(r, bio, io, pos);

	spin_lock_irqsave(&r->lock, irqflags);
	r->resv[pos % r->nr_slots] |= BDR_RESV_DONE;
	bdr_advance_head(r);
	goto unlock;

drop:
	r->dropped++;
	bdr_mark_dirty(r, io->start, io->end);
	bdr_set_state(r, r->state);
unlock:
	spin_unlock_irqrestore(&r->lock, irqflags);
	if (wq_has_sleeper(&r->wq))
		wake_up_interruptible(&r->wq);
}

/* ---------------------------------------------------------------------- */
/* Ring: allocation and lifetime                                           */

static void bdr_ring_release(struct device *dev)
{
	struct bdr_ring *r = container_of(dev, struct bdr_ring, dev);

	ida_free(&bdr_minor_ida, MINOR(dev->devt));
	vfree(r->mem);
	kvfree(r->resv);
	bitmap_free(r->bitmap);
	bitmap_free(r->spare);
	kfree(r);
}

static struct bdr_ring *bdr_ring_alloc(const char *name, u32 nr_slots,
				       u32 region_sectors, sector_t dev_sectors,
				       struct mapped_device *md, char **error)
{
	size_t desc_bytes = PAGE_ALIGN((size_t)nr_slots * sizeof(struct bdr_record));
	size_t data_bytes = (size_t)nr_slots * BDR_SLOT_DATA;
	struct bdr_ring *r;
	int minor, ret;

	r = kzalloc(sizeof(*r), GFP_KERNEL);
	if (!r) {
		*error = "Cannot allocate ring state";
		return ERR_PTR(-ENOMEM);
	}
	strscpy(r->name, name, sizeof(r->name));
	r->md = md;
	r->nr_slots = nr_slots;
	r->region_shift = ilog2(region_sectors);
	r->dev_sectors = dev_sectors;
	r->nr_regions = max_t(u64, 1, DIV_ROUND_UP_ULL(dev_sectors, region_sectors));
	r->bitmap_bytes = BITS_TO_LONGS(r->nr_regions) * sizeof(unsigned long);
	spin_lock_init(&r->lock);
	mutex_init(&r->take_lock);
	init_waitqueue_head(&r->wq);
	INIT_LIST_HEAD(&r->node);

	r->mem_size = PAGE_SIZE + desc_bytes + data_bytes;
	r->mem = vmalloc_user(r->mem_size);
	r->bitmap = bitmap_zalloc(r->nr_regions, GFP_KERNEL);
	r->spare = bitmap_zalloc(r->nr_regions, GFP_KERNEL);
	r->resv = kvcalloc(nr_slots, sizeof(*r->resv), GFP_KERNEL);
	if (!r->mem || !r->bitmap || !r->spare || !r->resv) {
		*error = "Cannot allocate ring buffer";
		ret = -ENOMEM;
		goto free_mem;
	}
	r->ctl = r->mem;
	r->desc = r->mem + PAGE_SIZE;
	r->data = r->mem + PAGE_SIZE + desc_bytes;
	r->ctl->magic = BDR_MAGIC;
	r->ctl->abi_version = BDR_ABI_VERSION;
	r->ctl->nr_slots = nr_slots;
	r->ctl->slot_data = BDR_SLOT_DATA;
	r->ctl->desc_offset = PAGE_SIZE;
	r->ctl->data_offset = PAGE_SIZE + desc_bytes;
	r->ctl->mmap_size = r->mem_size;
	r->ctl->instance = get_random_u64();

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
	ret = dev_set_name(&r->dev, "%s", name);
	if (ret) {
		*error = "Cannot name the character device";
		put_device(&r->dev);
		return ERR_PTR(ret);
	}
	return r;

free_mem:
	vfree(r->mem);
	kvfree(r->resv);
	bitmap_free(r->bitmap);
	bitmap_free(r->spare);
	kfree(r);
	return ERR_PTR(ret);
}

static const struct file_operations bdr_fops;

/* Find or create the ring named @name for @md.  Called under bdr_lock. */
static struct bdr_ring *bdr_ring_get(const char *name, u32 nr_slots,
				     u32 region_sectors, sector_t dev_sectors,
				     struct mapped_device *md, char **error)
{
	struct bdr_ring *r;
	int ret;

	list_for_each_entry(r, &bdr_rings, node) {
		if (strcmp(r->name, name))
			continue;
		if (r->md != md) {
			*error = "Character device name already in use by another bdr target";
			return ERR_PTR(-EBUSY);
		}
		/* A reload of the same device keeps its ring and records. */
		if (r->nr_slots != nr_slots || r->region_shift != ilog2(region_sectors) ||
		    r->dev_sectors != dev_sectors) {
			*error = "Ring geometry cannot change on reload: remove and create the target";
			return ERR_PTR(-EINVAL);
		}
		r->targets++;
		get_device(&r->dev);
		return r;
	}

	r = bdr_ring_alloc(name, nr_slots, region_sectors, dev_sectors, md, error);
	if (IS_ERR(r))
		return r;
	cdev_init(&r->cdev, &bdr_fops);
	r->cdev.owner = THIS_MODULE;
	ret = cdev_device_add(&r->cdev, &r->dev);
	if (ret) {
		*error = "Cannot register the character device";
		put_device(&r->dev);
		return ERR_PTR(ret);
	}
	r->registered = true;
	r->targets = 1;
	list_add(&r->node, &bdr_rings);
	return r;
}

static void bdr_ring_put_target(struct bdr_ring *r)
{
	unsigned long irqflags;

	mutex_lock(&bdr_lock);
	if (--r->targets == 0) {
		list_del_init(&r->node);
		spin_lock_irqsave(&r->lock, irqflags);
		r->dead = true;
		bdr_set_state(r, r->state | BDR_STATE_DEAD);
		spin_unlock_irqrestore(&r->lock, irqflags);
		wake_up_interruptible(&r->wq);
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

	/* chrdev_open holds the cdev, whose parent is r->dev: r is alive. */
	get_device(&r->dev);
	file->private_data = r;
	return 0;
}

static int bdr_release(struct inode *inode, struct file *file)
{
	struct bdr_ring *r = file->private_data;

	put_device(&r->dev);
	return 0;
}

static int bdr_mmap(struct file *file, struct vm_area_struct *vma)
{
	struct bdr_ring *r = file->private_data;

	if (!(vma->vm_flags & VM_SHARED))
		return -EINVAL;
	return remap_vmalloc_range(vma, r->mem, vma->vm_pgoff);
}

static __poll_t bdr_poll(struct file *file, poll_table *wait)
{
	struct bdr_ring *r = file->private_data;
	__poll_t mask = 0;
	u64 head, tail, seen;

	poll_wait(file, &r->wq, wait);
	head = smp_load_acquire(&r->ctl->head);
	tail = READ_ONCE(r->ctl->tail);
	seen = READ_ONCE(r->ctl->seen);
	/* The consumer's read position: seen if it lies in [tail, head]. */
	if (seen - tail > head - tail)
		seen = tail;
	if (head != seen ||
	    (READ_ONCE(r->ctl->state) & (BDR_STATE_OVERFLOW | BDR_STATE_DIRTY)))
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
		.desc_offset = r->ctl->desc_offset,
		.data_offset = r->ctl->data_offset,
		.mmap_size = r->mem_size,
		.dev_sectors = r->dev_sectors,
		.region_sectors = 1U << r->region_shift,
		.nr_regions = r->nr_regions,
		.bitmap_bytes = r->bitmap_bytes,
		.instance = r->ctl->instance,
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
	st->next_seq = r->next_seq;
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

static long bdr_ioctl_take_dirty(struct bdr_ring *r, void __user *arg)
{
	struct bdr_dirty d;
	unsigned long irqflags;
	unsigned long *taken;
	long ret = 0;

	if (copy_from_user(&d, arg, sizeof(d)))
		return -EFAULT;
	if (d.bitmap_bytes < r->bitmap_bytes)
		return -EINVAL;

	mutex_lock(&r->take_lock);
	spin_lock_irqsave(&r->lock, irqflags);
	taken = r->bitmap;
	r->bitmap = r->spare;		/* zeroed */
	d.state = r->state;
	/* Reserved slots completed before the handover: they count as before it. */
	d.ring_head = r->reserve;
	d.next_seq = r->next_seq;
	bdr_set_state(r, r->state & ~(BDR_STATE_OVERFLOW | BDR_STATE_DIRTY));
	spin_unlock_irqrestore(&r->lock, irqflags);

	d.nr_dirty = bitmap_weight(taken, r->nr_regions);
	if (copy_to_user(u64_to_user_ptr(d.bitmap), taken, r->bitmap_bytes) ||
	    copy_to_user(arg, &d, sizeof(d))) {
		/* Nothing may be lost: give the regions back. */
		spin_lock_irqsave(&r->lock, irqflags);
		bitmap_or(r->bitmap, r->bitmap, taken, r->nr_regions);
		bdr_set_state(r, r->state | BDR_STATE_DIRTY);
		spin_unlock_irqrestore(&r->lock, irqflags);
		ret = -EFAULT;
	}
	bitmap_zero(taken, r->nr_regions);
	r->spare = taken;
	mutex_unlock(&r->take_lock);
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
		return bdr_ioctl_take_dirty(r, uarg);
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
	struct bdr_target *bt = container_of(work, struct bdr_target, submit_work);
	struct bdr_io *io;

	/* Move one io at a time so that it is always on a list new bios check. */
	for (;;) {
		spin_lock_irq(&bt->io_lock);
		io = list_first_entry_or_null(&bt->ready, struct bdr_io, list);
		if (io)
			list_move_tail(&io->list, &bt->inflight);
		spin_unlock_irq(&bt->io_lock);
		if (!io)
			break;
		dm_submit_bio_remap(dm_bio_from_per_bio_data(io, sizeof(*io)), NULL);
	}
}

/*
 * Remove a completed io and release the waiters it no longer blocks, in
 * arrival order: a waiter also waits for earlier waiters it overlaps.
 */
static void bdr_io_done(struct bdr_target *bt, struct bdr_io *io)
{
	struct bdr_io *w, *tmp;
	unsigned long irqflags;
	bool kick = false;
	LIST_HEAD(blocked);

	spin_lock_irqsave(&bt->io_lock, irqflags);
	list_del(&io->list);
	list_for_each_entry_safe(w, tmp, &bt->waiting, list) {
		if (bdr_overlaps(&bt->inflight, w) || bdr_overlaps(&bt->ready, w) ||
		    bdr_overlaps(&blocked, w)) {
			list_move_tail(&w->list, &blocked);
			continue;
		}
		list_move_tail(&w->list, &bt->ready);
		kick = true;
	}
	list_splice(&blocked, &bt->waiting);
	spin_unlock_irqrestore(&bt->io_lock, irqflags);
	if (kick)
		queue_work(bt->wq, &bt->submit_work);
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

/*
 * Construct a bdr mapping:
 *
 *   <device> <chardev_name> <buffer_size_in_writes> [<region_sectors>]
 *
 * device:                the device to replicate, mapped 1:1 from sector 0
 * chardev_name:          /dev/<chardev_name> gives the client the ring
 * buffer_size_in_writes: ring slots, one 4 KiB write each
 *                        (BDR_SLOT_DATA + sizeof(struct bdr_record) bytes)
 * region_sectors:        dirty bitmap granularity, a power of two >= 8
 *                        (default BDR_DEFAULT_REGION_SECTORS)
 */
static int bdr_ctr(struct dm_target *ti, unsigned int argc, char **argv)
{
	u32 region_sectors = BDR_DEFAULT_REGION_SECTORS;
	struct bdr_target *bt;
	struct bdr_ring *r;
	unsigned long long slots_ram;
	u32 nr_slots;
	char dummy;
	int ret;

	if (argc != 3 && argc != 4) {
		ti->error = "Invalid argument count: <device> <chardev_name> <buffer_size_in_writes> [<region_sectors>]";
		return -EINVAL;
	}
	if (!bdr_valid_name(argv[1])) {
		ti->error = "Invalid chardev_name: 1-31 characters of [A-Za-z0-9_.-]";
		return -EINVAL;
	}
	if (sscanf(argv[2], "%u%c", &nr_slots, &dummy) != 1 || !nr_slots ||
	    nr_slots > BDR_MAX_SLOTS) {
		ti->error = "Invalid buffer_size_in_writes: a number from 1 to 16777216";
		return -EINVAL;
	}
	/* Refuse a ring larger than half of RAM rather than fail vmalloc. */
	slots_ram = (unsigned long long)totalram_pages() << PAGE_SHIFT;
	if ((unsigned long long)nr_slots * (BDR_SLOT_DATA + sizeof(struct bdr_record)) >
	    slots_ram / 2) {
		ti->error = "buffer_size_in_writes needs more than half of the memory";
		return -ENOMEM;
	}
	if (argc == 4 &&
	    (sscanf(argv[3], "%u%c", &region_sectors, &dummy) != 1 ||
	     region_sectors < 8 || region_sectors > BDR_MAX_REGION_SECTORS ||
	     !is_power_of_2(region_sectors))) {
		ti->error = "Invalid region_sectors: a power of two from 8 to 16777216";
		return -EINVAL;
	}

	bt = kzalloc(sizeof(*bt), GFP_KERNEL);
	if (!bt) {
		ti->error = "Cannot allocate target context";
		return -ENOMEM;
	}
	spin_lock_init(&bt->io_lock);
	INIT_LIST_HEAD(&bt->inflight);
	INIT_LIST_HEAD(&bt->waiting);
	INIT_LIST_HEAD(&bt->ready);
	INIT_WORK(&bt->submit_work, bdr_submit_work);

	ret = dm_get_device(ti, argv[0], dm_table_get_mode(ti->table), &bt->dev);
	if (ret) {
		ti->error = "Device lookup failed";
		goto free_bt;
	}

	bt->wq = alloc_workqueue("bdr_%s", WQ_MEM_RECLAIM | WQ_UNBOUND, 1, argv[1]);
	if (!bt->wq) {
		ti->error = "Cannot allocate workqueue";
		ret = -ENOMEM;
		goto put_dev;
	}

	mutex_lock(&bdr_lock);
	r = bdr_ring_get(argv[1], nr_slots, region_sectors, ti->len,
			 dm_table_get_md(ti->table), &ti->error);
	mutex_unlock(&bdr_lock);
	if (IS_ERR(r)) {
		ret = PTR_ERR(r);
		goto destroy_wq;
	}
	bt->ring = r;

	ti->private = bt;
	ti->num_flush_bios = 1;
	ti->flush_supported = true;
	ti->num_discard_bios = 1;
	ti->num_write_zeroes_bios = 1;
	ti->per_io_data_size = sizeof(struct bdr_io);
	return 0;

destroy_wq:
	destroy_workqueue(bt->wq);
put_dev:
	dm_put_device(ti, bt->dev);
free_bt:
	kfree(bt);
	return ret;
}

static void bdr_dtr(struct dm_target *ti)
{
	struct bdr_target *bt = ti->private;

	/* dm drained all I/O; the queue may still hold a finished kick. */
	destroy_workqueue(bt->wq);
	WARN_ON_ONCE(!list_empty(&bt->inflight) || !list_empty(&bt->waiting));
	bdr_ring_put_target(bt->ring);
	dm_put_device(ti, bt->dev);
	kfree(bt);
}

static bool bdr_changes_data(struct bio *bio)
{
	switch (bio_op(bio)) {
	case REQ_OP_WRITE:
		return bio_sectors(bio) != 0;
	case REQ_OP_DISCARD:
	case REQ_OP_WRITE_ZEROES:
		return true;
	default:
		return false;
	}
}

static int bdr_map(struct dm_target *ti, struct bio *bio)
{
	struct bdr_target *bt = ti->private;
	struct bdr_io *io = dm_per_bio_data(bio, sizeof(*io));
	unsigned long irqflags;
	bool wait;

	bio_set_dev(bio, bt->dev->bdev);
	if (bio_sectors(bio) || op_is_zone_mgmt(bio_op(bio)))
		bio->bi_iter.bi_sector = dm_target_offset(ti, bio->bi_iter.bi_sector);

	io->tracked = false;
	io->iter = bio->bi_iter;
	io->start = bio->bi_iter.bi_sector;
	io->end = bio_end_sector(bio);
	if (!bdr_changes_data(bio))
		return DM_MAPIO_REMAPPED;

	INIT_LIST_HEAD(&io->list);
	io->tracked = true;
	spin_lock_irqsave(&bt->io_lock, irqflags);
	wait = bdr_overlaps(&bt->inflight, io) || bdr_overlaps(&bt->waiting, io) ||
	       bdr_overlaps(&bt->ready, io);
	list_add_tail(&io->list, wait ? &bt->waiting : &bt->inflight);
	spin_unlock_irqrestore(&bt->io_lock, irqflags);
	return wait ? DM_MAPIO_SUBMITTED : DM_MAPIO_REMAPPED;
}

static int bdr_end_io(struct dm_target *ti, struct bio *bio, blk_status_t *error)
{
	struct bdr_target *bt = ti->private;
	struct bdr_io *io = dm_per_bio_data(bio, sizeof(*io));

	if (!op_is_write(bio_op(bio)))
		return DM_ENDIO_DONE;
	/* Publish before releasing overlapping waiters: ring order = disk order. */
	bdr_publish(bt->ring, bio, io, *error);
	if (io->tracked)
		bdr_io_done(bt, io);
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
	struct bdr_target *bt = ti->private;
	struct bdr_ring *r = bt->ring;
	struct bdr_status st;
	unsigned int sz = 0;

	switch (type) {
	case STATUSTYPE_INFO:
		bdr_snapshot(r, &st);
		DMEMIT("state=%s fill=%llu/%u records=%llu bytes=%llu dropped=%llu failed=%llu dirty_regions=%llu overflows=%llu next_seq=%llu",
		       bdr_state_name(st.state), st.head - st.tail, r->nr_slots,
		       st.records, st.bytes, st.dropped, st.failed,
		       st.dirty_regions, st.overflows, st.next_seq);
		break;
	case STATUSTYPE_TABLE:
		DMEMIT("%s %s %u %u", bt->dev->name, r->name, r->nr_slots,
		       1U << r->region_shift);
		break;
	case STATUSTYPE_IMA:
		DMEMIT_TARGET_NAME_VERSION(ti->type);
		DMEMIT(",device_name=%s,chardev_name=%s,buffer_size_in_writes=%u;",
		       bt->dev->name, r->name, r->nr_slots);
		break;
	}
}

static int bdr_iterate_devices(struct dm_target *ti,
			       iterate_devices_callout_fn fn, void *data)
{
	struct bdr_target *bt = ti->private;

	return fn(ti, bt->dev, 0, ti->len, data);
}

static void bdr_io_hints(struct dm_target *ti, struct queue_limits *limits)
{
	/* Pages must not change while written: the ring copy must equal the disk. */
	limits->features |= BLK_FEAT_STABLE_WRITES;
}

static struct target_type bdr_target = {
	.name = "bdr",
	.version = {1, 0, 0},
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

	ret = alloc_chrdev_region(&bdr_devt, 0, BDR_MINORS, "bdr");
	if (ret)
		return ret;
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
	return ret;
}

static void __exit dm_bdr_exit(void)
{
	dm_unregister_target(&bdr_target);
	class_unregister(&bdr_class);
	unregister_chrdev_region(bdr_devt, BDR_MINORS);
	ida_destroy(&bdr_minor_ida);
}

module_init(dm_bdr_init);
module_exit(dm_bdr_exit);

MODULE_DESCRIPTION(DM_NAME " target capturing writes for block device replication");
MODULE_AUTHOR("BDR developers");
MODULE_LICENSE("GPL");
