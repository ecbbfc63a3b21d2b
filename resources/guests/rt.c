/* Mosaic guest runtime (see mosaic.h and docs/GUEST-ABI.md). */
#include "mosaic.h"

/* ---- Run control ------------------------------------------------------------ */

void guest_exit(uint32_t code)
{
    outl(PORT_EXIT, code);
    for (;;)
        cpu_relax();
}

void guest_park(void)
{
    outl(PORT_PARK, 0);
    for (;;)
        cpu_relax();
}

/* ---- Serial console --------------------------------------------------------- */

static struct spinlock console;

void console_lock(void)
{
    spin_lock(&console);
}

void console_unlock(void)
{
    spin_unlock(&console);
}

void print_char(char c)
{
    /* The VMM's UART accepts every byte: no LSR polling (it could only hang). */
    outb(PORT_COM1, (uint8_t)c);
}

void print_str(const char *s)
{
    while (*s)
        print_char(*s++);
}

void print_u64(uint64_t v)
{
    char buf[20];
    unsigned n = 0;

    do {
        buf[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        print_char(buf[--n]);
}

static const char hex_digits[16] = "0123456789abcdef";

void print_hex_pad(uint64_t v, unsigned digits)
{
    if (digits > 16)
        digits = 16;
    while (digits--)
        print_char(hex_digits[(v >> (digits * 4)) & 0xf]);
}

void print_hex(uint64_t v)
{
    unsigned digits = 1;

    while (digits < 16 && (v >> (digits * 4)))
        digits++;
    print_hex_pad(v, digits);
}

/* ---- Boot info -------------------------------------------------------------- */

bool boot_info_valid(const struct boot_info *bi)
{
    return bi->magic == MOSAIC_BOOT_MAGIC && bi->version == MOSAIC_BOOT_VERSION &&
           bi->nr_free <= MOSAIC_MAX_FREE;
}

uint64_t free_pages(const struct boot_info *bi)
{
    uint64_t p = 0;

    for (uint32_t i = 0; i < bi->nr_free; i++)
        p += bi->free[i].len / PAGE_SIZE;
    return p;
}

static const char *layout_error; /* set (atomically) by any vCPU before the first barrier */

static void layout_fail(const char *why)
{
    __atomic_store_n(&layout_error, why, __ATOMIC_RELEASE);
}

/* noinline: its frame is on the calling vCPU's stack, which the check needs. */
__attribute__((noinline)) void layout_check(uint32_t vcpu, uint32_t nvcpus, const struct boot_info *bi,
                                            bool need_page_per_vcpu)
{
    uint64_t sp = (uint64_t)__builtin_frame_address(0);

    if (vcpu == 0) {
        if (!boot_info_valid(bi)) {
            layout_fail("invalid boot info");
            return;
        }
        if (nvcpus > MOSAIC_MAX_VCPUS) {
            layout_fail("too many vcpus");
            return;
        }
        if (free_overlaps(bi, 0, (uint64_t)__image_end)) {
            layout_fail("free range overlaps the system area or image");
            return;
        }
        if (need_page_per_vcpu && free_pages(bi) < nvcpus) {
            layout_fail("fewer free pages than vcpus");
            return;
        }
    }
    if (boot_info_valid(bi) && free_overlaps(bi, sp - 4096, sp + 8)) /* up to the saved RBP */
        layout_fail("free range overlaps a vcpu stack");
}

int layout_exit(uint32_t vcpu, const char *prog)
{
    const char *why = __atomic_load_n(&layout_error, __ATOMIC_ACQUIRE);

    if (!why)
        return -1;
    if (vcpu != 0)
        return 0;
    console_lock();
    print_str(prog);
    print_str(": bad layout: ");
    print_str(why);
    print_str("\n");
    print_str(prog);
    print_str(": FAIL\n");
    console_unlock();
    return 1;
}

void print_mismatch(const char *prog, uint32_t vcpu, uint64_t addr, uint64_t read, uint64_t expected)
{
    print_str(prog);
    print_str(": vcpu ");
    print_u64(vcpu);
    print_str(" first mismatch at 0x");
    print_hex(addr);
    print_str(" read 0x");
    print_hex_pad(read, 16);
    print_str(" expected 0x");
    print_hex_pad(expected, 16);
    print_char('\n');
}

/* ---- Synchronisation -------------------------------------------------------- */

void spin_lock(struct spinlock *l)
{
    for (;;) {
        if (!__atomic_exchange_n(&l->locked, 1, __ATOMIC_ACQUIRE))
            return;
        while (__atomic_load_n(&l->locked, __ATOMIC_RELAXED))
            cpu_relax();
    }
}

void spin_unlock(struct spinlock *l)
{
    __atomic_store_n(&l->locked, 0, __ATOMIC_RELEASE);
}

void barrier_wait(struct barrier *b, uint32_t n)
{
    /* Read the generation before arriving: it cannot advance until we have. */
    uint32_t gen = __atomic_load_n(&b->generation, __ATOMIC_ACQUIRE);

    if (__atomic_add_fetch(&b->count, 1, __ATOMIC_ACQ_REL) == n) {
        __atomic_store_n(&b->count, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&b->generation, gen + 1, __ATOMIC_RELEASE);
    } else {
        while (__atomic_load_n(&b->generation, __ATOMIC_ACQUIRE) == gen)
            cpu_relax();
    }
}

/* ---- Memory ----------------------------------------------------------------- */
/* String instructions, so gcc cannot turn these loops back into calls to themselves.
 * RFLAGS.DF is clear on entry (RFLAGS = 0x2) and gcc keeps it clear. */

void *memset(void *dst, int c, size_t n)
{
    void *d = dst;

    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
    void *d = dst;

    __asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
    return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
    unsigned char *d = dst;
    const unsigned char *s = src;

    if (d <= s || d >= s + n)
        return memcpy(dst, src, n);
    /* Overlapping with dst above src: copy backwards. */
    while (n) {
        n--;
        ((volatile unsigned char *)d)[n] = s[n];
    }
    return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const volatile unsigned char *x = a, *y = b;

    for (size_t i = 0; i < n; i++)
        if (x[i] != y[i])
            return x[i] < y[i] ? -1 : 1;
    return 0;
}
