/*
 * memtest: writes and verifies every free page listed in boot info.
 *
 * All free 4 KiB pages, concatenated over the free ranges in order, are split into
 * nvcpus contiguous shares: vCPU i owns pages [i*P/n, (i+1)*P/n). Each vCPU writes
 *     pattern(a) = (a ^ 0x5a5a5a5a5a5a5a5a) * 0x9e3779b97f4a7c15   (wrapping)
 * to every qword of its share (a = the qword's guest-physical address), timing the
 * pass with rdtsc; after a barrier it reads its share back, counting mismatches and
 * summing (wrapping) every qword read into a checksum. vCPU 0 then prints:
 *
 *   memtest: range 0x<gpa hex> +0x<len hex>                  (one per free range)
 *   memtest: vcpus <n> bytes <dec> checksum 0x<16 hex> mismatches <dec>
 *   memtest: write <dec> cycles/page <dec> ns/page
 *   memtest: ok                                              (or memtest: FAIL)
 *
 * On failure it prints, before the FAIL line, one line per vCPU that saw a mismatch:
 *   memtest: vcpu <i> first mismatch at 0x<hex> read 0x<16 hex> expected 0x<16 hex>
 * and on a bad layout (boot info, ranges over the image or a stack) one line
 *   memtest: bad layout: <reason>
 * followed by "memtest: FAIL".
 *
 * "cycles/page" is the sum over vCPUs of write-pass TSC cycles divided by the total
 * number of pages written (the mean cost of writing one page on one vCPU); ns/page
 * converts it with tsc_khz (0 if tsc_khz is 0). Returns 0 if all pages verified, 1
 * otherwise.
 */
#include "mosaic.h"

#define PATTERN_XOR 0x5a5a5a5a5a5a5a5aull
#define PATTERN_MUL 0x9e3779b97f4a7c15ull

static inline uint64_t pattern(uint64_t addr)
{
    return (addr ^ PATTERN_XOR) * PATTERN_MUL;
}

struct result {
    uint64_t pages;
    uint64_t write_cycles;
    uint64_t checksum;
    uint64_t mismatches;
    uint64_t bad_addr;     /* first mismatch */
    uint64_t bad_value;
} __attribute__((aligned(64))); /* one cache line per vCPU */

static struct result results[MOSAIC_MAX_VCPUS];
static struct barrier barrier;
/* Writes the pattern to every qword of [start, end). */
static __attribute__((noinline)) void write_span(uint64_t start, uint64_t end)
{
    for (uint64_t a = start; a < end; a += 8)
        *(uint64_t *)a = pattern(a);
    compiler_barrier();
}

/* Reads [start, end) back; adds to the result's checksum and mismatch count. */
static __attribute__((noinline)) void check_span(uint64_t start, uint64_t end, struct result *r)
{
    uint64_t sum = 0, bad = 0;

    compiler_barrier();
    for (uint64_t a = start; a < end; a += 8) {
        uint64_t v = *(volatile uint64_t *)a;
        sum += v;
        bad += v != pattern(a);
    }
    if (bad && !r->mismatches) {
        /* Slow path, once per vCPU: find the first bad qword for the report. */
        for (uint64_t a = start; a < end; a += 8) {
            uint64_t v = *(volatile uint64_t *)a;
            if (v != pattern(a)) {
                r->bad_addr = a;
                r->bad_value = v;
                break;
            }
        }
    }
    r->checksum += sum;
    r->mismatches += bad;
}

/* Calls write_span (check == NULL) or check_span over the pages [lo, hi) of the
 * concatenated free ranges. */
static void for_share(const struct boot_info *bi, uint64_t lo, uint64_t hi, struct result *check)
{
    uint64_t base = 0; /* page index of the current range's first page */

    for (uint32_t i = 0; i < bi->nr_free && base < hi; i++) {
        uint64_t pages = bi->free[i].len / PAGE_SIZE;
        uint64_t s = lo > base ? lo : base;
        uint64_t e = hi < base + pages ? hi : base + pages;

        if (s < e) {
            uint64_t start = bi->free[i].gpa + (s - base) * PAGE_SIZE;
            uint64_t end = bi->free[i].gpa + (e - base) * PAGE_SIZE;
            if (check)
                check_span(start, end, check);
            else
                write_span(start, end);
        }
        base += pages;
    }
}


static void print_report(uint32_t nvcpus, const struct boot_info *bi)
{
    uint64_t pages = 0, cycles = 0, checksum = 0, mismatches = 0;

    for (uint32_t i = 0; i < nvcpus; i++) {
        pages += results[i].pages;
        cycles += results[i].write_cycles;
        checksum += results[i].checksum;
        mismatches += results[i].mismatches;
    }

    uint64_t cycles_per_page = pages ? cycles / pages : 0;
    uint64_t mcycles_per_page = pages ? cycles * 1000 / pages : 0; /* milli-cycles */
    /* ns = cycles * 1e6 / kHz; from milli-cycles: mcycles * 1e3 / kHz. */
    uint64_t ns_per_page = bi->tsc_khz ? mcycles_per_page * 1000 / bi->tsc_khz : 0;

    console_lock();
    for (uint32_t i = 0; i < bi->nr_free; i++) {
        print_str("memtest: range 0x");
        print_hex(bi->free[i].gpa);
        print_str(" +0x");
        print_hex(bi->free[i].len);
        print_char('\n');
    }
    print_str("memtest: vcpus ");
    print_u64(nvcpus);
    print_str(" bytes ");
    print_u64(pages * PAGE_SIZE);
    print_str(" checksum 0x");
    print_hex_pad(checksum, 16);
    print_str(" mismatches ");
    print_u64(mismatches);
    print_char('\n');

    print_str("memtest: write ");
    print_u64(cycles_per_page);
    print_str(" cycles/page ");
    print_u64(ns_per_page);
    print_str(" ns/page\n");

    for (uint32_t i = 0; i < nvcpus; i++) {
        if (!results[i].mismatches)
            continue;
        print_mismatch("memtest", i, results[i].bad_addr, results[i].bad_value, pattern(results[i].bad_addr));
    }
    print_str(mismatches ? "memtest: FAIL\n" : "memtest: ok\n");
    console_unlock();
}

int guest_main(uint32_t vcpu, uint32_t nvcpus, const struct boot_info *bi)
{
    boot_marker();
    layout_check(vcpu, nvcpus, bi, false);
    barrier_wait(&barrier, nvcpus);
    int bad = layout_exit(vcpu, "memtest");
    if (bad >= 0)
        return bad;

    struct result *r = &results[vcpu];
    uint64_t total = free_pages(bi);
    uint64_t lo = vcpu * total / nvcpus, hi = (vcpu + 1) * total / nvcpus;

    r->pages = hi - lo;
    uint64_t t0 = rdtsc();
    for_share(bi, lo, hi, NULL);
    r->write_cycles = rdtsc() - t0;

    barrier_wait(&barrier, nvcpus);
    for_share(bi, lo, hi, r);
    barrier_wait(&barrier, nvcpus);

    if (vcpu != 0)
        return 0;
    print_report(nvcpus, bi);
    for (uint32_t i = 0; i < nvcpus; i++)
        if (results[i].mismatches)
            return 1;
    return 0;
}
