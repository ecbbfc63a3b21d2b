/*
 * convbench: conversion cost as the guest sees it (round trip through the conversion
 * port, timed with rdtsc), for 4 KiB, 2 MiB and 1 GiB requests, ZERO and PRESERVE,
 * plus the cost of a bare port exit for comparison. vCPU 0 only.
 *
 * Output:
 *   convbench: exit <ns> ns                     one `out` to an ignored port and back
 *   convbench: <4K|2M|1G> <zero|preserve> <n> ops <ns> ns/op
 *   convbench: ok
 * A size whose aligned block is not in free RAM is skipped:
 *   convbench: <size> skipped (no aligned free block)
 */
#include "mosaic.h"

static uint64_t ns(uint64_t cycles, uint64_t tsc_khz)
{
    return tsc_khz ? cycles * 1000000ull / tsc_khz : 0;
}

/* The first free GPA aligned to `align` with `len` bytes free after it, or 0. */
static uint64_t aligned_block(const struct boot_info *bi, uint64_t align, uint64_t len)
{
    for (uint32_t i = 0; i < bi->nr_free; i++) {
        uint64_t g = (bi->free[i].gpa + align - 1) & ~(align - 1);
        if (g + len <= bi->free[i].gpa + bi->free[i].len)
            return g;
    }
    return 0;
}

int guest_main(uint32_t vcpu, uint32_t nvcpus, const struct boot_info *bi)
{
    (void)nvcpus;
    boot_marker();
    if (vcpu != 0)
        return 0;
    if (!boot_info_valid(bi)) {
        print_str("convbench: bad layout\nconvbench: FAIL\n");
        return 1;
    }
    uint64_t khz = bi->tsc_khz;
    uint64_t t0 = rdtsc();
    for (uint32_t i = 0; i < 200; i++)
        outl(0x503, 0);
    print_str("convbench: exit ");
    print_u64(ns((rdtsc() - t0) / 200, khz));
    print_str(" ns\n");

    static const struct { const char *name; uint64_t bytes; uint32_t iters; } sizes[] = {
        { "4K", 4096, 500 },
        { "2M", 2ull << 20, 50 },
        { "1G", 1ull << 30, 3 },
    };
    int ok = 1;
    for (uint32_t s = 0; s < 3; s++) {
        uint64_t gpa = aligned_block(bi, sizes[s].bytes, sizes[s].bytes);
        if (!gpa) {
            print_str("convbench: ");
            print_str(sizes[s].name);
            print_str(" skipped (no aligned free block)\n");
            continue;
        }
        uint32_t pages = (uint32_t)(sizes[s].bytes >> 12);
        for (uint32_t preserve = 0; preserve < 2; preserve++) {
            uint32_t mode = preserve ? CONVERT_PRESERVE : 0;
            uint64_t cycles = 0, ops = 0;
            for (uint32_t i = 0; i < sizes[s].iters; i++) {
                for (uint32_t target = 0; target < 2; target++) {
                    /* private, then back to shared */
                    uint32_t flags = mode | (target == 0 ? CONVERT_PRIVATE : 0);
                    uint64_t a = rdtsc();
                    uint32_t st = convert_pages(gpa, pages, flags);
                    cycles += rdtsc() - a;
                    ops++;
                    if (st != CONVERT_OK)
                        ok = 0;
                }
            }
            print_str("convbench: ");
            print_str(sizes[s].name);
            print_str(preserve ? " preserve " : " zero ");
            print_u64(ops);
            print_str(" ops ");
            print_u64(ns(cycles / ops, khz));
            print_str(" ns/op\n");
        }
    }
    print_str(ok ? "convbench: ok\n" : "convbench: FAIL\n");
    return ok ? 0 : 1;
}
