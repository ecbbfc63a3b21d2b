/*
 * Mosaic guest runtime: the guest-program ABI (docs/GUEST-ABI.md) for freestanding C.
 *
 * Guest programs run at CPL3 in 64-bit long mode, identity-mapped, interrupts off.
 * Only the ports listed below are open; any other port raises #GP.
 */
#ifndef MOSAIC_H
#define MOSAIC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- ABI constants ---------------------------------------------------------- */

#define MOSAIC_BOOT_MAGIC    0x42534f4du /* "MOSB" */
#define MOSAIC_BOOT_VERSION  1u
#define MOSAIC_MAX_FREE      32u

#define PORT_COM1            0x3f8
#define PORT_EXIT            0x500
#define PORT_BOOT_MARKER     0x501
#define PORT_PARK            0x502
#define PORT_GENERATION      0x503 /* in32: live updates gone through (0 at first boot) */

#define PAGE_SIZE            4096ull
#define IMAGE_BASE           0x200000ull

/* Upper bound for per-vCPU arrays in programs (KVM_CAP_MAX_VCPUS here is 1024). */
#define MOSAIC_MAX_VCPUS     1024u

/* Private memory (docs/PRIVATE-MEMORY.md): per-vCPU 32-bit registers. */
#define PORT_CONVERT_GPA_LO   0x520 /* out32: GPA bits 31:0 */
#define PORT_CONVERT_GPA_HI   0x524 /* out32: GPA bits 63:32 */
#define PORT_CONVERT_PAGES    0x528 /* out32: number of 4 KiB pages */
#define PORT_CONVERT_DOORBELL 0x52c /* out32: flags, runs the request; in32: status */
#define PORT_DMA_GPA_LO       0x530 /* out32: GPA bits 31:0 */
#define PORT_DMA_GPA_HI       0x534 /* out32: GPA bits 63:32 */
#define PORT_DMA_LEN          0x538 /* out32: length; in32: the last READ's byte sum */
#define PORT_DMA_DOORBELL     0x53c /* out32: op | arg << 8, runs the request; in32: status */

#define CONVERT_PRIVATE      1u /* flags bit 0: target private (clear: shared) */
#define CONVERT_PRESERVE     2u /* flags bit 1: keep the contents (clear: ZERO) */
#define CONVERT_OK           0u /* conversion status codes */
#define CONVERT_INVALID      1u /* unaligned GPA, zero page count, unknown flag bits */
#define CONVERT_RANGE        2u /* overflow, or not entirely guest RAM */
#define CONVERT_UNSUPPORTED  3u

#define DMA_OP_READ          1u /* checksum the range (wrapping u32 byte sum) */
#define DMA_OP_FILL          2u /* write doorbell bits 15:8 to every byte */
#define DMA_MAX_LEN          (1u << 20)
#define DMA_OK               0u /* DMA status codes */
#define DMA_INVALID          1u /* bad op or length */
#define DMA_RANGE            2u /* not guest RAM */
#define DMA_PRIVATE          4u /* touches a private page */

/* ---- Boot-info block (at RDX on entry, little-endian) ----------------------- */

struct free_range {
    uint64_t gpa;   /* guest-physical start, 2 MiB aligned */
    uint64_t len;   /* bytes, 2 MiB aligned */
};

struct boot_info {
    uint32_t magic;         /*  0: MOSAIC_BOOT_MAGIC */
    uint32_t version;       /*  4: 1 */
    uint32_t nr_vcpus;      /*  8 */
    uint32_t page_shift;    /* 12: size of the guest mappings (21 = 2 MiB) */
    uint64_t total_ram;     /* 16: bytes */
    uint64_t tsc_khz;       /* 24: 0 if unknown */
    uint32_t nr_free;       /* 32: at most MOSAIC_MAX_FREE */
    uint32_t arg;           /* 36: the value of `mosaic run --guest-arg N` (0 if not given) */
    struct free_range free[MOSAIC_MAX_FREE]; /* 40: ascending */
};

_Static_assert(offsetof(struct boot_info, nr_vcpus) == 8, "boot_info layout");
_Static_assert(offsetof(struct boot_info, page_shift) == 12, "boot_info layout");
_Static_assert(offsetof(struct boot_info, total_ram) == 16, "boot_info layout");
_Static_assert(offsetof(struct boot_info, tsc_khz) == 24, "boot_info layout");
_Static_assert(offsetof(struct boot_info, nr_free) == 32, "boot_info layout");
_Static_assert(offsetof(struct boot_info, arg) == 36, "boot_info layout");
_Static_assert(offsetof(struct boot_info, free) == 40, "boot_info layout");
_Static_assert(sizeof(struct boot_info) == 40 + 16 * MOSAIC_MAX_FREE, "boot_info size");

/* Linker-script symbols: the loaded image is [__image_start, __image_end). */
extern char __image_start[], __image_end[];

/* The program's entry, called by crt0 on every vCPU. vCPU 0's return value becomes
 * the exit code; other vCPUs park when they return. */
int guest_main(uint32_t vcpu, uint32_t nvcpus, const struct boot_info *bi);

/* ---- Port I/O and CPU helpers ----------------------------------------------- */

static inline void outb(uint16_t port, uint8_t v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port) : "memory");
}

static inline void outw(uint16_t port, uint16_t v)
{
    __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port) : "memory");
}

static inline void outl(uint16_t port, uint32_t v)
{
    __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port) : "memory");
}

static inline uint8_t inb(uint16_t port)
{
    uint8_t v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port) : "memory");
    return v;
}

static inline uint16_t inw(uint16_t port)
{
    uint16_t v;
    __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port) : "memory");
    return v;
}

static inline uint32_t inl(uint16_t port)
{
    uint32_t v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port) : "memory");
    return v;
}

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi) : : "memory");
    return ((uint64_t)hi << 32) | lo;
}

static inline void cpu_relax(void)
{
    __asm__ volatile("pause" : : : "memory");
}

/* Compiler barrier: memory is not cached in registers across it. */
static inline void compiler_barrier(void)
{
    __asm__ volatile("" : : : "memory");
}

/* ---- Run control (ports 0x500-0x503) ---------------------------------------- */

/* Ends the whole run; the low 8 bits of `code` are `mosaic run`'s exit code. */
__attribute__((noreturn)) void guest_exit(uint32_t code);
/* This vCPU is done: the VMM stops its thread; the others run on. */
__attribute__((noreturn)) void guest_park(void);
/* Boot marker: the VMM times the first write from any vCPU. */
static inline void boot_marker(void)
{
    outb(PORT_BOOT_MARKER, 0);
}
/* Live updates (handovers to a new Mosaic process) this guest has gone through, low
 * 32 bits; 0 at first boot. One VMM exit; a live update's pause may fall inside it. */
static inline uint32_t live_generation(void)
{
    return inl(PORT_GENERATION);
}

/* ---- Serial console (COM1) -------------------------------------------------- */

/* Each byte is one `outb` to 0x3f8 (one VMM exit, ~60 us on nested hosts). The
 * console lock keeps lines from different vCPUs whole; print_* do not take it. */
void console_lock(void);
void console_unlock(void);
void print_char(char c);
void print_str(const char *s);
void print_u64(uint64_t v);                 /* decimal */
void print_hex(uint64_t v);                 /* lowercase, no leading zeros, no 0x */
void print_hex_pad(uint64_t v, unsigned digits); /* lowercase, zero-padded */

/* ---- Boot info -------------------------------------------------------------- */

/* True if magic, version and nr_free are sane. */
bool boot_info_valid(const struct boot_info *bi);

/* Number of 4 KiB pages in all free ranges. */
uint64_t free_pages(const struct boot_info *bi);

/* The layout checks of programs that split the free pages among vCPUs: every vCPU
 * calls layout_check() before its first barrier (vCPU 0 checks boot info, the vCPU
 * count, free ranges over the system area or image and, with need_page_per_vcpu, at
 * least one free page per vCPU; every vCPU checks that no free range covers its
 * stack); after the barrier, layout_exit() returns -1 if all was well, else prints
 * (vCPU 0) "<prog>: bad layout: <reason>" and "<prog>: FAIL" and returns the exit
 * code (1 on vCPU 0, 0 on the others). */
void layout_check(uint32_t vcpu, uint32_t nvcpus, const struct boot_info *bi, bool need_page_per_vcpu);
int layout_exit(uint32_t vcpu, const char *prog);

/* Prints "<prog>: vcpu <i> first mismatch at 0x<hex> read 0x<16 hex> expected 0x<16 hex>". */
void print_mismatch(const char *prog, uint32_t vcpu, uint64_t addr, uint64_t read, uint64_t expected);

/* ---- Atomics and synchronisation -------------------------------------------- */

static inline uint32_t atomic_load32(const uint32_t *p)
{
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

static inline void atomic_store32(uint32_t *p, uint32_t v)
{
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

static inline uint32_t atomic_inc32(uint32_t *p) /* returns the new value */
{
    return __atomic_add_fetch(p, 1, __ATOMIC_SEQ_CST);
}

static inline uint64_t atomic_add64(uint64_t *p, uint64_t v) /* returns the new value */
{
    return __atomic_add_fetch(p, v, __ATOMIC_SEQ_CST);
}

struct spinlock {
    uint32_t locked;
};

void spin_lock(struct spinlock *l);
void spin_unlock(struct spinlock *l);

/* Reusable sense-counting spin barrier for `n` participants; zero-initialised. */
struct barrier {
    uint32_t count;
    uint32_t generation;
};

void barrier_wait(struct barrier *b, uint32_t n);

/* ---- Private memory: conversion port and test DMA device -------------------- */
/* Both run the request on the doorbell write (one VMM exit per port access) and
 * return its status (CONVERT_* / DMA_*). The registers are this vCPU's own. */

static inline uint32_t convert_pages(uint64_t gpa, uint32_t pages, uint32_t flags)
{
    outl(PORT_CONVERT_GPA_LO, (uint32_t)gpa);
    outl(PORT_CONVERT_GPA_HI, (uint32_t)(gpa >> 32));
    outl(PORT_CONVERT_PAGES, pages);
    outl(PORT_CONVERT_DOORBELL, flags);
    return inl(PORT_CONVERT_DOORBELL);
}

/* `doorbell` is DMA_OP_READ, or DMA_OP_FILL | byte << 8. */
static inline uint32_t dma_request(uint64_t gpa, uint32_t len, uint32_t doorbell)
{
    outl(PORT_DMA_GPA_LO, (uint32_t)gpa);
    outl(PORT_DMA_GPA_HI, (uint32_t)(gpa >> 32));
    outl(PORT_DMA_LEN, len);
    outl(PORT_DMA_DOORBELL, doorbell);
    return inl(PORT_DMA_DOORBELL);
}

/* Byte sum (wrapping) of this vCPU's last successful DMA READ. */
static inline uint32_t dma_read_sum(void)
{
    return inl(PORT_DMA_LEN);
}

/* ---- Small shared helpers ----------------------------------------------------- */

/* xorshift64: a tiny PRNG; `*state` must not be 0. */
static inline uint64_t xorshift64(uint64_t *state)
{
    uint64_t x = *state;

    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    return x;
}

/* Whether [start, end) overlaps any free range of boot info. */
static inline bool free_overlaps(const struct boot_info *bi, uint64_t start, uint64_t end)
{
    for (uint32_t i = 0; i < bi->nr_free; i++) {
        uint64_t gpa = bi->free[i].gpa, len = bi->free[i].len;
        if (start < gpa + len && gpa < end)
            return true;
    }
    return false;
}

/* ---- Memory (gcc may emit calls to these) ----------------------------------- */

void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);

#endif /* MOSAIC_H */
