#!/usr/bin/env python3
"""Lines up the LUTRACE marks of live updates (MOSAIC_LIVE_UPDATE_TRACE=1, see
docs/LIVE-UPDATE.md) per update, times from the old process's kick (µs).

usage: lu-trace.py STDERR_FILE [SERIAL_FILE]

Prints, for each mark, its median time from the kick, the median step from the mark
before it and the thread's page faults; then one row per update. With the guest's
serial output (heartbeat), each row starts with the gap the guest saw.
"""
import collections
import statistics
import sys

ROW = ["left_run0", "left_run1", "paused", "sent", "arriving", "received", "decoded", "posted",
       "restored0", "restored1", "all_restored", "ready_seen", "commit", "first_run0", "first_run1"]


def main():
    events = []
    for line in open(sys.argv[1], errors="replace"):
        f = line.split()
        if len(f) == 5 and f[0] == "LUTRACE":
            try:
                events.append((int(f[1]), f[2], f[3], int(f[4])))
            except ValueError:
                pass  # two processes' lines interleaved
    events.sort()
    updates, cur = [], None
    for e in events:
        if e[2] == "kick":
            cur = []
            updates.append(cur)
        if cur is not None:
            cur.append(e)
    at, step, faults = (collections.defaultdict(list) for _ in range(3))
    rows = []
    for u in updates:
        t0, prev, seen, row = u[0][0], u[0][0], collections.Counter(), {}
        for t, _who, what, flt in u:
            seen[what] += 1
            key = what if seen[what] == 1 else f"{what}#{seen[what]}"
            at[key].append((t - t0) / 1000)
            step[key].append((t - prev) / 1000)
            faults[key].append(flt)
            row.setdefault(what, (t - t0) // 1000)
            prev = t
        rows.append(row)
    print(f"{len(updates)} updates; µs from the kick (medians)")
    for k in sorted(at, key=lambda k: statistics.median(at[k])):
        print(f"  {k:18s} at {statistics.median(at[k]):8.1f}  step {statistics.median(step[k]):7.1f}"
              f"  faults {faults[k][-1]}")
    gaps = []
    if len(sys.argv) > 2:
        for line in open(sys.argv[2], errors="replace"):
            if line.startswith("heartbeat: update"):
                gaps.append(int(line.split()[6]))
    print("\n  gap " + " ".join(f"{k[:11]:>11s}" for k in ROW))
    for i, r in enumerate(rows):
        g = gaps[i] if i < len(gaps) else -1
        print(f"{g:5d} " + " ".join(f"{r.get(k, -1):11d}" for k in ROW))


if __name__ == "__main__":
    main()
