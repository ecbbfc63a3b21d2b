/*
 * convstress: many random 4 KiB conversions over the program's RAM, then a memtest.
 *
 * vCPU 0 runs CONVSTRESS_N conversions of random single pages of its free RAM to a
 * random state (private/shared) with a random content mode (ZERO/PRESERVE). Before
 * each conversion it tags the page's first qword; afterwards the tag must still be
 * there after PRESERVE and the whole page must read as zeros after ZERO (the guest may
 * read its own private pages). Then it converts all of its free RAM back to shared
 * (PRESERVE) and runs the memtest pattern over it: write, read back, checksum.
 *
 * Output (vCPU 0):
 *   convstress: range 0x<gpa> +0x<len>            one line per free range
 *   convstress: conversions <n> zero-checks <n> preserve-checks <n> mismatches <n>
 *   convstress: memtest bytes <n> checksum 0x<16 hex> mismatches <n>
 *   convstress: ok | convstress: FAIL
 * Returns 0 on success, 1 otherwise.
 */
#include "mosaic.h"

#define CONVSTRESS_N 10000u

static uint64_t rng = 0x9e3779b97f4a7c15ull;

static inline uint64_t pattern(uint64_t addr)
{
    return (addr ^ 0x5a5a5a5a5a5a5a5aull) * 0x9e3779b97f4a7c15ull;
}

/* The guest-physical address of free page `k`, counting across the free ranges. */
static uint64_t page_addr(const struct boot_info *bi, uint64_t k)
{
    for (uint32_t i = 0; i < bi->nr_free; i++) {
        uint64_t n = bi->free[i].len >> 12;
        if (k < n)
            return bi->free[i].gpa + (k << 12);
        k -= n;
    }
    return 0;
}

static void fail_line(const char *what, uint64_t gpa, uint64_t got)
{
    print_str("convstress: ");
    print_str(what);
    print_str(" at 0x");
    print_hex(gpa);
    print_str(" got 0x");
    print_hex_pad(got, 16);
    print_str("\n");
}

int guest_main(uint32_t vcpu, uint32_t nvcpus, const struct boot_info *bi)
{
    (void)nvcpus;
    boot_marker();
    if (vcpu != 0)
        return 0;
    if (!boot_info_valid(bi) || bi->nr_free == 0) {
        print_str("convstress: bad layout\nconvstress: FAIL\n");
        return 1;
    }
    uint64_t pages = 0;
    for (uint32_t i = 0; i < bi->nr_free; i++) {
        print_str("convstress: range 0x");
        print_hex(bi->free[i].gpa);
        print_str(" +0x");
        print_hex(bi->free[i].len);
        print_str("\n");
        pages += bi->free[i].len >> 12;
    }

    uint64_t zero_checks = 0, preserve_checks = 0, mismatches = 0, conversions = 0;
    for (uint32_t n = 0; n < CONVSTRESS_N; n++) {
        uint64_t r = xorshift64(&rng);
        uint64_t gpa = page_addr(bi, (r >> 8) % pages);
        volatile uint64_t *q = (volatile uint64_t *)(uintptr_t)gpa;
        uint64_t tag = gpa ^ ((uint64_t)n << 40) ^ 0x7a67ull;
        q[0] = tag;
        uint32_t flags = (uint32_t)(r & (CONVERT_PRIVATE | CONVERT_PRESERVE));
        if (bi->arg & 1) /* --guest-arg 1: ZERO only (the kernel engine has no PRESERVE) */
            flags &= ~CONVERT_PRESERVE;
        uint32_t st = convert_pages(gpa, 1, flags);
        if (st != CONVERT_OK) {
            fail_line("conversion status", gpa, st);
            mismatches++;
            continue;
        }
        conversions++;
        if (flags & CONVERT_PRESERVE) {
            preserve_checks++;
            if (q[0] != tag) {
                fail_line("PRESERVE lost the tag", gpa, q[0]);
                mismatches++;
            }
        } else {
            /* A page already in the target state is not scrubbed: only a change zeros. */
            uint64_t v = q[0];
            if (v != 0 && v != tag) {
                fail_line("ZERO left data", gpa, v);
                mismatches++;
            }
            if (v == 0) {
                zero_checks++;
                for (uint32_t i = 1; i < 512; i++) {
                    if (q[i] != 0) {
                        fail_line("ZERO left data", gpa + 8 * i, q[i]);
                        mismatches++;
                        break;
                    }
                }
            }
        }
    }
    print_str("convstress: conversions ");
    print_u64(conversions);
    print_str(" zero-checks ");
    print_u64(zero_checks);
    print_str(" preserve-checks ");
    print_u64(preserve_checks);
    print_str(" mismatches ");
    print_u64(mismatches);
    print_str("\n");

    /* Everything back to shared (keeping contents), then the memtest pattern. */
    for (uint32_t i = 0; i < bi->nr_free; i++) {
        uint64_t left = bi->free[i].len >> 12, gpa = bi->free[i].gpa;
        while (left) {
            uint32_t chunk = left > 0x40000 ? 0x40000 : (uint32_t)left;
            uint32_t st = convert_pages(gpa, chunk, CONVERT_PRESERVE);
            if (st != CONVERT_OK) {
                fail_line("final conversion status", gpa, st);
                mismatches++;
            }
            gpa += (uint64_t)chunk << 12;
            left -= chunk;
        }
    }
    uint64_t sum = 0, bad = 0, bytes = 0;
    for (uint32_t i = 0; i < bi->nr_free; i++) {
        volatile uint64_t *p = (volatile uint64_t *)(uintptr_t)bi->free[i].gpa;
        uint64_t n = bi->free[i].len / 8;
        for (uint64_t j = 0; j < n; j++)
            p[j] = pattern(bi->free[i].gpa + 8 * j);
    }
    for (uint32_t i = 0; i < bi->nr_free; i++) {
        volatile uint64_t *p = (volatile uint64_t *)(uintptr_t)bi->free[i].gpa;
        uint64_t n = bi->free[i].len / 8;
        for (uint64_t j = 0; j < n; j++) {
            uint64_t v = p[j];
            sum += v;
            bad += v != pattern(bi->free[i].gpa + 8 * j);
        }
        bytes += bi->free[i].len;
    }
    print_str("convstress: memtest bytes ");
    print_u64(bytes);
    print_str(" checksum 0x");
    print_hex_pad(sum, 16);
    print_str(" mismatches ");
    print_u64(bad);
    print_str("\n");
    bool ok = mismatches == 0 && bad == 0 && conversions == CONVSTRESS_N;
    print_str(ok ? "convstress: ok\n" : "convstress: FAIL\n");
    return ok ? 0 : 1;
}
