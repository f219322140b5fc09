// SPDX-License-Identifier: GPL-2.0-only
/*
 * Test lab helper: loading this module emits exactly one kernel WARN and then fails with -EAGAIN, so it
 * never stays loaded and can be inserted again.  The lab's own tests use it to prove that a kernel WARN
 * in the guest makes a test fail.
 */
#include <linux/bug.h>
#include <linux/errno.h>
#include <linux/init.h>
#include <linux/module.h>

static int __init lab_warn_init(void)
{
	WARN(1, "bdr-lab: deliberate warning from lab_warn\n");
	return -EAGAIN;
}
module_init(lab_warn_init);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("BDR test lab helper: emits one kernel WARN on load");
