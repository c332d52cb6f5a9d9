"""Memory maps held by a process that fits many differently sized models (Linux only).

    python scripts/check_memory_maps.py                 # 60 fits, pig subsets of 12..48 pigs
    python scripts/check_memory_maps.py --fits 120 --formula "weight ~ week + (1 | id)"

Each XLA:CPU executable maps its code into the process, and Linux allows a process
``vm.max_map_count`` maps (65,530 by default): past that, XLA's next mmap fails and the process
dies with a segfault. jaxmixed keeps at most ``runtime.programs.MAX_RESIDENT`` compiled
programs in memory (README, "Runtime settings"). This loop fits the pig model on the first k
pigs, k cycling through --sizes (a new set of shapes, hence new programs, for each k the first
time round), and prints the process's memory maps, the programs held and dropped, and the time.
Before the bound, the maps grew by about 600 a fit without levelling off.
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings


def maps() -> int:
    with open("/proc/self/maps", "rb") as fh:
        return fh.read().count(b"\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fits", type=int, default=60)
    ap.add_argument("--sizes", type=int, nargs=2, default=(12, 48), metavar=("FIRST", "LAST"))
    ap.add_argument("--formula", default="weight ~ week + (week | id)")
    args = ap.parse_args()

    import jaxmixed as jm
    from jaxmixed.runtime import programs

    warnings.simplefilter("ignore")
    pig = jm.datasets.load("pig")
    ids = sorted(pig.id.unique())
    sizes = list(range(args.sizes[0], args.sizes[1] + 1))
    limit = open("/proc/sys/vm/max_map_count").read().strip()
    print(f"machine: {platform.machine()}, {platform.processor() or '?'}; vm.max_map_count {limit}; "
          f"MAX_RESIDENT {getattr(programs, 'MAX_RESIDENT', 'none')}")
    start, t0 = maps(), time.perf_counter()
    print(f"{'fit':>4} {'pigs':>5} {'maps':>7} {'held':>5} {'dropped':>8} {'s':>7}")
    peak = start
    for i in range(args.fits):
        k = sizes[i % len(sizes)]
        jm.fit(args.formula, pig[pig.id.isin(ids[:k])])
        n = maps()
        peak = max(peak, n)
        if i % 5 == 4 or i == args.fits - 1:
            held = len(getattr(programs, "_resident", ())) or "-"  # "-": code without the bound
            print(f"{i + 1:>4} {k:>5} {n:>7} {held:>5} {programs.STATS.get('dropped', '-'):>8} "
                  f"{time.perf_counter() - t0:>7.1f}")
    print(f"maps: {start} before the first fit, peak {peak}, {maps()} at the end")


if __name__ == "__main__":
    main()
