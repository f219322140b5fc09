"""Random writes for the VM tests: sizes 512 B to 1 MiB, aligned and unaligned to 4 KiB, buffered and O_DIRECT.

workload.py DEVICE --seed S --count N [--span BYTES] [--dsync]
"""

from __future__ import annotations

import argparse
import mmap
import os
import random


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("device")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--span", type=int, default=0, help="bytes of the device to write into (default: all)")
    args = ap.parse_args()
    rnd = random.Random(args.seed)
    fd = os.open(args.device, os.O_RDWR)
    dfd = os.open(args.device, os.O_RDWR | os.O_DIRECT)
    size = os.lseek(fd, 0, os.SEEK_END)
    span = args.span or size
    buf = mmap.mmap(-1, 1 << 20)  # page aligned, as O_DIRECT needs
    written = 0
    for _ in range(args.count):
        nsect = rnd.choice([1, 7, 8, 9, 16, 64, 255, 256, 2048, rnd.randint(1, 2048)])
        length = nsect * 512
        if rnd.random() < 0.5:
            offset = rnd.randrange(0, (span - length) // 4096 + 1) * 4096
        else:
            offset = rnd.randrange(0, (span - length) // 512 + 1) * 512
        data = rnd.randbytes(length)
        if rnd.random() < 0.5:
            buf[:length] = data
            os.pwritev(dfd, [memoryview(buf)[:length]], offset)
        else:
            os.pwrite(fd, data, offset)
        written += length
    os.fsync(fd)
    os.close(fd)
    os.close(dfd)
    print(f"wrote {written} bytes in {args.count} writes")


if __name__ == "__main__":
    main()
