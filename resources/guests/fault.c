/*
 * fault: touches an unmapped address so the VMM reports a page fault.
 *
 * vCPU 0 prints "fault: touching unmapped address" and reads a qword from
 * 0x700000000000 (canonical, never mapped). The VMM reports #PF (vector 14) with
 * CR2 0x700000000000 and error code 0x4 (user-mode read of a non-present page), and
 * `mosaic run` exits with 125. Every vCPU writes the boot marker first; the others
 * then park.
 */
#include "mosaic.h"

#define UNMAPPED_ADDR 0x700000000000ull

int guest_main(uint32_t vcpu, uint32_t nvcpus, const struct boot_info *bi)
{
    (void)nvcpus;
    (void)bi;
    boot_marker();
    if (vcpu != 0)
        return 0;

    console_lock();
    print_str("fault: touching unmapped address\n");
    console_unlock();

    uint64_t v = *(volatile uint64_t *)UNMAPPED_ADDR;

    /* Not reached: the read faults and the VMM stops the run. */
    print_str("fault: read 0x");
    print_hex(v);
    print_str(" from an unmapped address without a fault\n");
    return 1;
}
