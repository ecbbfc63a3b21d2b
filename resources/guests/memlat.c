/*
 * memlat: pointer-chase load latency over a working set much larger than TLB reach.
 *
 * The working set is the free RAM listed in boot info: every free 4 KiB page, the
 * ranges concatenated in order, at most 4 GiB (MEMLAT_MAX_BYTES). Page k of the
 * working set holds one 8-byte chase slot at a cache-line offset 64 * line(k), with
 * line(k) in 1..63 from a fixed hash of k (line 0 holds set-up data, see below). The
 * slots are linked into one random cycle through all pages (Sattolo's algorithm with
 * a fixed-seed xorshift64 PRNG, so every run chases the same cycle), so every load of
 * the chase `p = *(void **)p` goes to a different page: a TLB miss per access unless
 * the pages are mapped huge all the way down (guest and host).
 *
 * vCPU 0 builds the cycle (first touch of every page), walks it once to warm up and
 * check that it is a single cycle through all pages, then times
 * steps = max(2 * pages, 1000000) dependent loads with rdtsc and prints:
 *
 *   memlat: working set <bytes> pages <n> steps <n>
 *   memlat: <cycles>.<d> cycles/access <ns>.<d> ns/access
 *   memlat: ok
 *
 * (decimal, one decimal place, rounded; ns from boot-info tsc_khz, 0.0 if it is 0)
 * and returns 0. On a bad layout (invalid boot info, free RAM over the image or the
 * stack, fewer than MEMLAT_MIN_PAGES free pages) it prints only
 *   memlat: bad layout: <reason>
 * and returns 1; if the warm-up walk finds a broken cycle (memory not holding what
 * was written) it prints
 *   memlat: FAIL: cycle length <n> expected <pages>
 * and returns 1. The other vCPUs write the boot marker and return (they park).
 */
#include "mosaic.h"

#define MEMLAT_MAX_BYTES  (4ull << 30)
#define MEMLAT_MAX_PAGES  (MEMLAT_MAX_BYTES / PAGE_SIZE)
#define MEMLAT_MIN_PAGES  1024ull
#define MEMLAT_MIN_STEPS  1000000ull
#define MEMLAT_SEED       0x2545f4914f6cdd1dull /* xorshift64 state: any non-zero value */
#define LINE_SIZE         64ull
#define LINES_PER_PAGE    (PAGE_SIZE / LINE_SIZE)

/* The working set: free ranges clipped to MEMLAT_MAX_PAGES, with the index of each
 * range's first page in the concatenation. */
struct span {
    uint64_t first_page;
    uint64_t pages;
    uint64_t gpa;
};

static struct span spans[MOSAIC_MAX_FREE];
static uint32_t nr_spans;
static uint64_t nr_pages;

/* Keeps the chase's final pointer alive, so gcc cannot drop the timed loop. */
static volatile uint64_t sink;


/* Uniform-enough integer in [0, n) (n > 0): the high half of r * n. */
static uint64_t below(uint64_t *state, uint64_t n)
{
    return (uint64_t)(((unsigned __int128)xorshift64(state) * n) >> 64);
}

/* Guest-physical address of page k of the working set (k < nr_pages). */
static uint64_t page_addr(uint64_t k)
{
    uint32_t i = 0;

    while (i + 1 < nr_spans && k >= spans[i + 1].first_page)
        i++;
    return spans[i].gpa + (k - spans[i].first_page) * PAGE_SIZE;
}

/* Cache line (1 .. LINES_PER_PAGE-1) of page k's chase slot: a fixed mix of k
 * (splitmix64's finaliser), so the offset within the page varies from step to step. */
static uint64_t slot_line(uint64_t k)
{
    uint64_t z = k + 0x9e3779b97f4a7c15ull;

    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return 1 + z % (LINES_PER_PAGE - 1);
}

static uint64_t slot_addr(uint64_t k)
{
    return page_addr(k) + slot_line(k) * LINE_SIZE;
}

/* The Sattolo array: element k lives in the first qword of page k (cache line 0,
 * which no chase slot uses). */
static inline uint32_t *elem(uint64_t k)
{
    return (uint32_t *)page_addr(k);
}


/* Fills in spans/nr_pages; returns NULL or the reason the layout is unusable. */
static const char *layout(const struct boot_info *bi)
{
    uint64_t sp = (uint64_t)__builtin_frame_address(0);

    if (!boot_info_valid(bi))
        return "invalid boot info";
    if (bi->nr_free == 0)
        return "no free RAM";
    if (free_overlaps(bi, 0, (uint64_t)__image_end))
        return "free range overlaps the system area or image";
    if (free_overlaps(bi, sp - 4096, sp + 8)) /* up to the saved RBP */
        return "free range overlaps the stack";

    nr_spans = 0;
    nr_pages = 0;
    for (uint32_t i = 0; i < bi->nr_free && nr_pages < MEMLAT_MAX_PAGES; i++) {
        uint64_t pages = bi->free[i].len / PAGE_SIZE;

        if (pages > MEMLAT_MAX_PAGES - nr_pages)
            pages = MEMLAT_MAX_PAGES - nr_pages;
        if (!pages)
            continue;
        spans[nr_spans].first_page = nr_pages;
        spans[nr_spans].pages = pages;
        spans[nr_spans].gpa = bi->free[i].gpa;
        nr_spans++;
        nr_pages += pages;
    }
    if (nr_pages < MEMLAT_MIN_PAGES)
        return "fewer than 1024 free pages";
    return NULL;
}

/*
 * Links the chase slots into one random cycle through all nr_pages pages:
 *  1. a[k] = k for every page (the first touch of every page, in order);
 *  2. Sattolo's shuffle of a[], which leaves k -> a[k] a single cycle of length n;
 *  3. slot(k) = &slot(a[k]) for every page, in order.
 * O(pages); a[] lives in the pages themselves, so no extra memory is needed.
 * Returns the address of page 0's slot (the start of the chase).
 */
static __attribute__((noinline)) void **build_cycle(void)
{
    uint64_t n = nr_pages, rng = MEMLAT_SEED;

    for (uint32_t s = 0; s < nr_spans; s++)
        for (uint64_t j = 0; j < spans[s].pages; j++)
            *(uint32_t *)(spans[s].gpa + j * PAGE_SIZE) = (uint32_t)(spans[s].first_page + j);

    for (uint64_t i = n - 1; i > 0; i--) {
        uint64_t j = below(&rng, i); /* j < i: Sattolo, not Fisher-Yates */
        uint32_t *ai = elem(i), *aj = elem(j);
        uint32_t t = *ai;

        *ai = *aj;
        *aj = t;
    }

    for (uint32_t s = 0; s < nr_spans; s++)
        for (uint64_t j = 0; j < spans[s].pages; j++) {
            uint64_t page = spans[s].gpa + j * PAGE_SIZE;
            uint64_t k = spans[s].first_page + j;

            *(uint64_t *)(page + slot_line(k) * LINE_SIZE) = slot_addr(*(uint32_t *)page);
        }
    compiler_barrier();
    return (void **)slot_addr(0);
}

/* One walk around the cycle: the number of steps until it is back at `start`
 * (at most limit + 1, so a broken cycle cannot hang the run). */
static __attribute__((noinline)) uint64_t cycle_length(void **start, uint64_t limit)
{
    void **p = start;
    uint64_t len = 0;

    do {
        p = (void **)*p;
        len++;
    } while (p != start && len <= limit);
    return len;
}

/* The timed chase: `steps` dependent loads from `start`; returns where it ended. */
static __attribute__((noinline)) void **chase(void **start, uint64_t steps)
{
    void **p = start;

    for (uint64_t i = 0; i < steps; i++)
        p = (void **)*p;
    return p;
}

/* Prints tenths as "<int>.<digit>". */
static void print_tenths(uint64_t tenths)
{
    print_u64(tenths / 10);
    print_char('.');
    print_char((char)('0' + tenths % 10));
}

int guest_main(uint32_t vcpu, uint32_t nvcpus, const struct boot_info *bi)
{
    (void)nvcpus;
    boot_marker();
    if (vcpu != 0)
        return 0;

    const char *bad = layout(bi);
    if (bad) {
        print_str("memlat: bad layout: ");
        print_str(bad);
        print_char('\n');
        return 1;
    }

    uint64_t steps = 2 * nr_pages;
    if (steps < MEMLAT_MIN_STEPS)
        steps = MEMLAT_MIN_STEPS;

    print_str("memlat: working set ");
    print_u64(nr_pages * PAGE_SIZE);
    print_str(" pages ");
    print_u64(nr_pages);
    print_str(" steps ");
    print_u64(steps);
    print_char('\n');

    void **start = build_cycle();

    /* Warm-up (untimed): one full cycle, which also checks it visits every page. */
    uint64_t len = cycle_length(start, nr_pages);
    if (len != nr_pages) {
        print_str("memlat: FAIL: cycle length ");
        print_u64(len);
        print_str(" expected ");
        print_u64(nr_pages);
        print_char('\n');
        return 1;
    }

    uint64_t t0 = rdtsc();
    void **end = chase(start, steps);
    uint64_t cycles = rdtsc() - t0;
    sink = (uint64_t)end;

    /* Milli-cycles per access, then tenths (rounded): cycles = mc / 1000 and
     * ns = cycles * 1e6 / tsc_khz, so tenths of ns = mc * 1e4 / tsc_khz. */
    uint64_t mc = cycles * 1000 / steps;
    uint64_t cycle_tenths = (mc + 50) / 100;
    uint64_t ns_tenths = bi->tsc_khz ? (mc * 10000 + bi->tsc_khz / 2) / bi->tsc_khz : 0;

    print_str("memlat: ");
    print_tenths(cycle_tenths);
    print_str(" cycles/access ");
    print_tenths(ns_tenths);
    print_str(" ns/access\n");
    print_str("memlat: ok\n");
    return 0;
}
