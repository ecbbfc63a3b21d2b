/*
 * hypercall: page conversions through the KVM_HC_MAP_GPA_RANGE hypercall, the path
 * confidential guests use (docs/PRIVATE-MEMORY.md). Needs CPL0: run with
 * `--guest-cpl 0` on a host where `mosaic host-check` reports kernel-mode code as
 * native (KVM emulates CPL0 code elsewhere, and its hypercalls do not reach the VMM).
 *
 * vCPU 0 (the others return at once), P = the first page of the first free range:
 *   1  write a secret over P; vmcall MAP_GPA_RANGE(P, 1, private) -> 0;
 *      DMA READ P -> 4 (PRIVATE); P reads zeros (the hypercall has no content mode:
 *      Mosaic converts with ZERO, and the page changed state)
 *   2  write 0x3c over P; vmcall MAP_GPA_RANGE(P, 1, shared) -> 0; P reads zeros;
 *      DMA READ P -> 0, sum 0
 *   3  bad requests, each refused with a nonzero result and P unchanged (shared,
 *      zeros): unknown attribute bits (1 << 8); a page-size hint of 3; a range that
 *      ends in the MMIO hole (0xc0000000 - 4096, 2 pages)
 *   hypercall: step <n> ok | hypercall: step <n> FAIL <what>: expected 0x<hex> got 0x<hex>
 * then "hypercall: ok" (exit 0) or "hypercall: FAIL" (exit 1).
 */
#include "mosaic.h"

#define KVM_HC_MAP_GPA_RANGE      12ull
#define MAP_GPA_RANGE_ENCRYPTED   (1ull << 4)
#define QWORDS                    (PAGE_SIZE / 8)

static uint64_t map_gpa_range(uint64_t gpa, uint64_t pages, uint64_t attrs)
{
    uint64_t ret = KVM_HC_MAP_GPA_RANGE;
    __asm__ volatile("vmcall" : "+a"(ret) : "b"(gpa), "c"(pages), "d"(attrs) : "memory");
    return ret;
}

static int failed;

static void expect(uint32_t step, const char *what, uint64_t want, uint64_t got)
{
    if (want == got || failed)
        return;
    failed = 1;
    print_str("hypercall: step ");
    print_u64(step);
    print_str(" FAIL ");
    print_str(what);
    print_str(": expected 0x");
    print_hex(want);
    print_str(" got 0x");
    print_hex(got);
    print_char('\n');
}

static uint64_t fill_check(volatile uint64_t *p, uint64_t v)
{
    uint64_t bad = 0;
    for (uint64_t i = 0; i < QWORDS; i++)
        bad += p[i] != v;
    return bad;
}

static void step_done(uint32_t step)
{
    if (failed)
        return;
    print_str("hypercall: step ");
    print_u64(step);
    print_str(" ok\n");
}

int guest_main(uint32_t vcpu, uint32_t nvcpus, const struct boot_info *bi)
{
    (void)nvcpus;
    if (vcpu != 0)
        return 0;
    boot_marker();
    if (bi->magic != MOSAIC_BOOT_MAGIC || bi->nr_free == 0) {
        print_str("hypercall: bad layout: no free RAM\nhypercall: FAIL\n");
        return 1;
    }
    uint64_t P = bi->free[0].gpa;
    volatile uint64_t *p = (volatile uint64_t *)(uintptr_t)P;

    for (uint64_t i = 0; i < QWORDS; i++)
        p[i] = 0x5ec7e70000ull + i;
    expect(1, "MAP_GPA_RANGE private", 0, map_gpa_range(P, 1, MAP_GPA_RANGE_ENCRYPTED));
    expect(1, "DMA READ of a private page", DMA_PRIVATE, dma_request(P, PAGE_SIZE, DMA_OP_READ));
    expect(1, "qwords not zero after the conversion", 0, fill_check(p, 0));
    step_done(1);

    for (uint64_t i = 0; i < QWORDS; i++)
        p[i] = 0x3c3c3c3c3c3c3c3cull;
    expect(2, "MAP_GPA_RANGE shared", 0, map_gpa_range(P, 1, 0));
    expect(2, "qwords not zero after the conversion", 0, fill_check(p, 0));
    expect(2, "DMA READ of a shared page", DMA_OK, dma_request(P, PAGE_SIZE, DMA_OP_READ));
    expect(2, "DMA sum", 0, dma_read_sum());
    step_done(2);

    expect(3, "unknown attribute bits refused", 1, map_gpa_range(P, 1, 1ull << 8) != 0);
    expect(3, "page-size hint 3 refused", 1, map_gpa_range(P, 1, 3) != 0);
    expect(3, "range into the MMIO hole refused", 1, map_gpa_range(0xc0000000ull - PAGE_SIZE, 2, 0) != 0);
    expect(3, "P still shared (DMA)", DMA_OK, dma_request(P, PAGE_SIZE, DMA_OP_READ));
    expect(3, "P unchanged", 0, fill_check(p, 0));
    step_done(3);

    print_str(failed ? "hypercall: FAIL\n" : "hypercall: ok\n");
    return failed;
}
