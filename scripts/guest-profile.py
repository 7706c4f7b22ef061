#!/usr/bin/env python3
"""Symbolises a VMC_GUEST_PROFILE sample file with the guest kernel's System.map.

usage: scripts/guest-profile.py SAMPLES SYSTEM.MAP [TOP]
"""
import bisect, collections, sys

samples, sysmap = sys.argv[1], sys.argv[2]
top = int(sys.argv[3]) if len(sys.argv) > 3 else 40
syms = []
for line in open(sysmap):
    addr, kind, name = line.split()[:3]
    if kind.lower() in "tw":
        syms.append((int(addr, 16), name))
syms.sort()
addrs = [a for a, _ in syms]
count = collections.Counter()
total = 0
for line in open(samples):
    rip = int(line, 16)
    total += 1
    if rip < 0xffffffff80000000:
        count["[user]"] += 1
        continue
    i = bisect.bisect_right(addrs, rip) - 1
    count[syms[i][1] if i >= 0 else "?"] += 1
for name, n in count.most_common(top):
    print(f"{n:7d} {100.0 * n / total:5.1f}%  {name}")
print(f"{total:7d} samples")
