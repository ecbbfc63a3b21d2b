/*
 * hello: the default guest program.
 *
 * Every vCPU writes the boot marker and checks in on a shared counter; vCPU 0 waits
 * for all of them and prints one line:
 *
 *   Hello from Mosaic! guest RAM <MiB> MiB, <n> vCPUs online
 *
 * then returns 0 (exit code 0). The other vCPUs return and park.
 */
#include "mosaic.h"

static uint32_t online;

int guest_main(uint32_t vcpu, uint32_t nvcpus, const struct boot_info *bi)
{
    boot_marker();
    atomic_inc32(&online);
    if (vcpu != 0)
        return 0;

    if (!boot_info_valid(bi)) {
        print_str("hello: bad boot info (magic 0x");
        print_hex(bi->magic);
        print_str(")\n");
        return 2;
    }

    uint32_t n;
    while ((n = atomic_load32(&online)) != nvcpus)
        cpu_relax();

    console_lock();
    print_str("Hello from Mosaic! guest RAM ");
    print_u64(bi->total_ram >> 20);
    print_str(" MiB, ");
    print_u64(n);
    print_str(" vCPUs online\n");
    console_unlock();
    return 0;
}
