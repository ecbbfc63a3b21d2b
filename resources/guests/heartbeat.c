/*
 * heartbeat: keeps every free page under a steady write load and measures the pauses
 * the guest sees, for live-update tests.
 *
 * All free 4 KiB pages, concatenated over the free ranges in order, are split into
 * nvcpus contiguous shares: vCPU i owns pages [i*P/n, (i+1)*P/n). Each vCPU rewrites
 * its share cyclically, page by page; pass p (from 1, per vCPU) covers the share once.
 * A page at guest-physical g written in pass p holds
 *     qword 0        p
 *     qword j=1..510 pattern((g + 8*j) ^ (p * 0x9e3779b97f4a7c15))
 *     qword 511      h * 0x9e3779b97f4a7c15, where h = 0, then h = rotl64(h, 23) ^ q
 *                    for each of qwords 0..510 in order
 * with memtest's pattern(a) = (a ^ 0x5a5a5a5a5a5a5a5a) * 0x9e3779b97f4a7c15 (all
 * arithmetic wrapping). After every page a vCPU takes t = rdtsc(); the gap t - (the
 * previous t) is the time between two page writes, and the largest is its max gap.
 *
 * vCPU 0 also reads the generation port (0x503) every 1 ms of TSC time (every 256
 * pages if tsc_khz is 0). The read is a VMM exit and stays inside the gaps, so a
 * live update's pause counts wherever it falls. When the generation has changed, the
 * update's gap is the largest gap since the previous read (including the time up to
 * the end of this read). vCPU 0 counts its own pages in rolling windows of 100 ms
 * (2^28 cycles if tsc_khz is 0; a window ends at the first read at least that long
 * after its start, and one still open at an update is dropped): "before" is the last
 * window completed before the update (0 if none), "after" the pages in the same span
 * from the update's detection on. When that after window ends, vCPU 0 prints
 *
 *   heartbeat: update <generation> gap <cycles> cycles <us> us after <pages> pages before <pages> pages
 *
 * (us = cycles * 1000 / tsc_khz, 0 if tsc_khz is 0). Nothing is printed inside a
 * window, and the time spent printing is not counted as a gap. Every generation value
 * read gets exactly one line (a jump by more than 1 between reads gets one line, for
 * the new value); after windows of updates that follow each other closely overlap,
 * and with more than 4 pending the oldest is printed early with the pages so far.
 *
 * The run ends when vCPU 0 has read a generation >= N = boot info's arg
 * (`--guest-arg N`) and printed every update line; with N = 0, after 1 s of TSC time
 * (2 full passes of vCPU 0 if tsc_khz is 0). A vCPU stops only after finishing the
 * page it is writing and at least one full pass. After a barrier each vCPU verifies
 * its whole share: with P its current pass and c the index in its share of the page
 * it would have written next, pages before c must hold pass P and the rest pass P-1
 * (every qword and the checksum). vCPU 0 then prints
 *
 *   heartbeat: vcpus <n> bytes <dec> passes <dec> updates <dec>
 *   heartbeat: max gap <cycles> cycles <us> us
 *   heartbeat: ok                                            (or heartbeat: FAIL)
 *
 * "bytes" is the size of all shares, "passes" the sum over vCPUs of completed passes,
 * "updates" the last generation read and "max gap" the largest gap of any vCPU over
 * the whole run. On failure, one line per vCPU with a bad page comes before FAIL:
 *   heartbeat: vcpu <i> first mismatch at 0x<hex> read 0x<16 hex> expected 0x<16 hex>
 * and on a bad layout (boot info, ranges over the image or a stack, fewer free pages
 * than vCPUs) only
 *   heartbeat: bad layout: <reason>
 *   heartbeat: FAIL
 * Returns 0 if every page verified, 1 otherwise.
 */
#include "mosaic.h"

#define PATTERN_XOR 0x5a5a5a5a5a5a5a5aull
#define PATTERN_MUL 0x9e3779b97f4a7c15ull
#define QWORDS      (PAGE_SIZE / 8)
#define MAX_PENDING 4u
#define WINDOW_NO_KHZ (1ull << 28) /* window length in cycles if tsc_khz is 0 */

static inline uint64_t pattern(uint64_t addr)
{
    return (addr ^ PATTERN_XOR) * PATTERN_MUL;
}

static inline uint64_t rotl64(uint64_t x, unsigned r)
{
    return (x << r) | (x >> (64 - r));
}

/* Qword j (1..510) of a page written in `pass`; `a` is its guest-physical address. */
static inline uint64_t page_qword(uint64_t a, uint64_t pass)
{
    return pattern(a ^ (pass * PATTERN_MUL));
}

struct result {
    uint64_t pass;          /* the pass being written: completed passes + 1 */
    uint64_t next;          /* index in the share of the next page to write */
    uint64_t max_gap;       /* cycles */
    uint64_t mismatches;    /* pages */
    uint64_t bad_addr;      /* first mismatch */
    uint64_t bad_value;
    uint64_t bad_expected;
} __attribute__((aligned(64))); /* one cache line per vCPU */

static struct result results[MOSAIC_MAX_VCPUS];
static struct barrier barrier;
static uint32_t stop;          /* set by vCPU 0: finish the page and stop */
static uint32_t updates;       /* the last generation vCPU 0 read */
/* ---- Pages -------------------------------------------------------------------- */

static __attribute__((noinline)) void write_page(uint64_t gpa, uint64_t pass)
{
    uint64_t *q = (uint64_t *)gpa;
    uint64_t h = pass; /* rotl64(0, 23) ^ pass */

    q[0] = pass;
    for (uint64_t j = 1; j < QWORDS - 1; j++) {
        uint64_t v = page_qword(gpa + 8 * j, pass);
        q[j] = v;
        h = rotl64(h, 23) ^ v;
    }
    q[QWORDS - 1] = h * PATTERN_MUL;
    compiler_barrier();
}

/* Checks one page written in `pass`; records the first bad qword in `r` if it is
 * the vCPU's first bad page. Returns true if the page is bad. */
static __attribute__((noinline)) bool check_page(uint64_t gpa, uint64_t pass, struct result *r)
{
    const volatile uint64_t *q = (const volatile uint64_t *)gpa;
    uint64_t h = 0;
    bool bad = false;

    for (uint64_t j = 0; j < QWORDS; j++) {
        uint64_t want;
        if (j == 0)
            want = pass;
        else if (j < QWORDS - 1)
            want = page_qword(gpa + 8 * j, pass);
        else
            want = h * PATTERN_MUL;
        h = rotl64(h, 23) ^ want;

        uint64_t v = q[j];
        if (v != want) {
            if (!bad && !r->mismatches) {
                r->bad_addr = gpa + 8 * j;
                r->bad_value = v;
                r->bad_expected = want;
            }
            bad = true;
        }
    }
    return bad;
}

/* ---- A vCPU's share ----------------------------------------------------------- */

struct share {
    const struct boot_info *bi;
    uint64_t pages;   /* length */
    uint32_t range0;  /* free range and address of its first page */
    uint64_t gpa0;
};

struct cursor {
    uint32_t range;
    uint64_t gpa;
    uint64_t idx;     /* index in the share */
};

/* The share of pages [lo, hi) of the concatenated free ranges (lo < hi). */
static void share_init(struct share *s, const struct boot_info *bi, uint64_t lo, uint64_t hi)
{
    uint64_t base = 0;

    s->bi = bi;
    s->pages = hi - lo;
    s->range0 = 0;
    s->gpa0 = 0;
    for (uint32_t i = 0; i < bi->nr_free; i++) {
        uint64_t n = bi->free[i].len / PAGE_SIZE;
        if (lo < base + n) {
            s->range0 = i;
            s->gpa0 = bi->free[i].gpa + (lo - base) * PAGE_SIZE;
            return;
        }
        base += n;
    }
}

static void cursor_reset(struct cursor *c, const struct share *s)
{
    c->range = s->range0;
    c->gpa = s->gpa0;
    c->idx = 0;
}

/* Moves to the next page of the share; true if it wrapped to the first. */
static inline bool cursor_next(struct cursor *c, const struct share *s)
{
    const struct free_range *f = s->bi->free;

    if (++c->idx == s->pages) {
        cursor_reset(c, s);
        return true;
    }
    c->gpa += PAGE_SIZE;
    while (c->gpa + PAGE_SIZE > f[c->range].gpa + f[c->range].len) {
        c->range++;
        c->gpa = f[c->range].gpa;
    }
    return false;
}

/* ---- vCPU 0: generation checks and update lines -------------------------------- */

struct update {
    uint32_t gen;
    uint64_t gap;          /* cycles */
    uint64_t before;       /* pages in the last window completed before it */
    uint64_t start;        /* TSC at detection: the after window starts */
    uint64_t start_pages;  /* vCPU 0's page count then */
};

struct monitor {
    uint64_t khz;
    uint64_t window;       /* cycles */
    uint32_t gen;          /* last generation read */
    uint64_t check_gap;    /* largest gap since the last read */
    uint64_t win_start, win_pages; /* the open rolling window: TSC, page count at start */
    uint64_t before;       /* pages in the last completed window */
    struct update pending[MAX_PENDING];
    uint32_t head, npending;
};

static uint64_t cycles_to_us(uint64_t cycles, uint64_t khz)
{
    return khz ? cycles * 1000 / khz : 0;
}

static void print_update(const struct monitor *m, const struct update *u, uint64_t after)
{
    console_lock();
    print_str("heartbeat: update ");
    print_u64(u->gen);
    print_str(" gap ");
    print_u64(u->gap);
    print_str(" cycles ");
    print_u64(cycles_to_us(u->gap, m->khz));
    print_str(" us after ");
    print_u64(after);
    print_str(" pages before ");
    print_u64(u->before);
    print_str(" pages\n");
    console_unlock();
}

/* Prints the oldest pending update with the pages since its detection. */
static void pop_update(struct monitor *m, uint64_t pages)
{
    const struct update *u = &m->pending[m->head];

    print_update(m, u, pages - u->start_pages);
    m->head = (m->head + 1) % MAX_PENDING;
    m->npending--;
}

/* One generation check. `t` is the TSC after the last page written, `pages` vCPU 0's
 * page count, `last` its gap reference (moved past any printing). */
static void check_generation(struct monitor *m, uint64_t t, uint64_t pages, uint64_t *last)
{
    uint32_t gen = live_generation();
    bool printed = false;

    if (gen != m->gen) {
        /* The pause may have been inside this very read: count up to its end. */
        uint64_t now = rdtsc();
        uint64_t gap = now - *last > m->check_gap ? now - *last : m->check_gap;

        if (m->npending == MAX_PENDING) {
            pop_update(m, pages);
            printed = true;
        }
        struct update *u = &m->pending[(m->head + m->npending) % MAX_PENDING];
        u->gen = gen;
        u->gap = gap;
        u->before = m->before;
        u->start = now;
        u->start_pages = pages;
        m->npending++;
        m->gen = gen;
        /* The open window may hold the pause: drop it. */
        m->win_start = now;
        m->win_pages = pages;
    } else if (t > m->win_start && t - m->win_start >= m->window) {
        m->before = pages - m->win_pages;
        m->win_start = t;
        m->win_pages = pages;
    }
    m->check_gap = 0;

    while (m->npending) {
        const struct update *u = &m->pending[m->head];
        if (!(t > u->start && t - u->start >= m->window))
            break;
        pop_update(m, pages);
        printed = true;
    }
    if (printed) {
        /* Printing is many exits: keep it out of the gaps and the windows. */
        *last = rdtsc();
        m->win_start = *last;
        m->win_pages = pages;
    }
}

/* ---- Main loop ------------------------------------------------------------------ */

/* Writes the share until stopped; fills r->pass, r->next and r->max_gap. */
static void run(uint32_t vcpu, const struct share *s, const struct boot_info *bi, struct result *r)
{
    struct cursor c;
    struct monitor m = { 0 };
    uint64_t pass = 1, pages = 0, max_gap = 0;
    uint32_t arg = bi->arg;
    uint64_t khz = bi->tsc_khz;

    cursor_reset(&c, s);
    m.khz = khz;
    m.window = khz ? 100 * khz : WINDOW_NO_KHZ;
    if (vcpu == 0)
        m.gen = live_generation();

    uint64_t t0 = rdtsc(), last = t0, last_check = t0;
    m.win_start = t0;

    for (;;) {
        write_page(c.gpa, pass);
        if (cursor_next(&c, s))
            pass++;
        pages++;

        uint64_t t = rdtsc(), gap = t - last;
        last = t;
        if (gap > max_gap)
            max_gap = gap;
        if (gap > m.check_gap)
            m.check_gap = gap;

        if (vcpu != 0) {
            if (pass >= 2 && atomic_load32(&stop))
                break;
            continue;
        }
        if (khz ? t - last_check < khz : (pages & 255) != 0)
            continue;
        last_check = t;
        check_generation(&m, t, pages, &last);

        bool end;
        if (arg)
            end = m.gen >= arg;
        else
            end = khz ? t - t0 >= 1000 * khz : pass >= 3;
        if (end && pass >= 2 && m.npending == 0) {
            atomic_store32(&stop, 1);
            break;
        }
    }
    if (vcpu == 0)
        updates = m.gen;
    r->pass = pass;
    r->next = c.idx;
    r->max_gap = max_gap;
}

/* Verifies the share: pages before r->next hold pass r->pass, the rest r->pass - 1. */
static void verify(const struct share *s, struct result *r)
{
    struct cursor c;

    cursor_reset(&c, s);
    do {
        uint64_t pass = c.idx < r->next ? r->pass : r->pass - 1;
        if (check_page(c.gpa, pass, r))
            r->mismatches++;
    } while (!cursor_next(&c, s));
}

/* ---- Layout and report ---------------------------------------------------------- */

static bool print_report(uint32_t nvcpus, const struct boot_info *bi)
{
    uint64_t passes = 0, max_gap = 0;
    bool fail = false;

    for (uint32_t i = 0; i < nvcpus; i++) {
        passes += results[i].pass - 1;
        if (results[i].max_gap > max_gap)
            max_gap = results[i].max_gap;
        fail |= results[i].mismatches != 0;
    }

    console_lock();
    print_str("heartbeat: vcpus ");
    print_u64(nvcpus);
    print_str(" bytes ");
    print_u64(free_pages(bi) * PAGE_SIZE);
    print_str(" passes ");
    print_u64(passes);
    print_str(" updates ");
    print_u64(updates);
    print_str("\nheartbeat: max gap ");
    print_u64(max_gap);
    print_str(" cycles ");
    print_u64(cycles_to_us(max_gap, bi->tsc_khz));
    print_str(" us\n");

    for (uint32_t i = 0; i < nvcpus; i++) {
        if (!results[i].mismatches)
            continue;
        print_mismatch("heartbeat", i, results[i].bad_addr, results[i].bad_value, results[i].bad_expected);
    }
    print_str(fail ? "heartbeat: FAIL\n" : "heartbeat: ok\n");
    console_unlock();
    return !fail;
}

int guest_main(uint32_t vcpu, uint32_t nvcpus, const struct boot_info *bi)
{
    boot_marker();
    layout_check(vcpu, nvcpus, bi, true);
    barrier_wait(&barrier, nvcpus);
    int bad = layout_exit(vcpu, "heartbeat");
    if (bad >= 0)
        return bad;

    struct result *r = &results[vcpu];
    struct share s;
    uint64_t total = free_pages(bi);

    share_init(&s, bi, vcpu * total / nvcpus, (vcpu + 1) * total / nvcpus);
    run(vcpu, &s, bi, r);
    barrier_wait(&barrier, nvcpus);
    verify(&s, r);
    barrier_wait(&barrier, nvcpus);

    if (vcpu != 0)
        return 0;
    return print_report(nvcpus, bi) ? 0 : 1;
}
