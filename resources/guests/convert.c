/*
 * convert: private/shared page conversion through the conversion port (0x520-0x52c)
 * and the test DMA device (0x530-0x53c), docs/PRIVATE-MEMORY.md.
 *
 * Run with `--memory size=...,private=on`: every page the program owns starts private.
 * P is the first page of the first free range in boot info.
 *
 * Part A (vCPU 0; the others wait at a barrier), one line per step:
 *   1  write the secret (qword i = 0x5ec7e70000 + i) over P
 *   2  DMA READ P -> 4 (PRIVATE)
 *   3  convert P shared, ZERO -> 0; P reads zeros; DMA READ P -> 0, sum 0
 *   4  DMA FILL P with 0xa5 -> 0; P reads 0xa5; DMA READ P -> 0, sum 0xa5000
 *   5  convert P private, PRESERVE -> 0; P still reads 0xa5; DMA READ P -> 4
 *   6  write the secret; convert P shared, PRESERVE -> 0; secret intact;
 *      DMA READ P -> 0, sum = the guest's own byte sum of P
 *   7  convert P private, ZERO -> 0; P reads zeros; DMA READ P -> 4
 *   8  write the secret, then bad requests, each with its status and, after each,
 *      P still holding the secret and DMA READ P still 4 (still private).
 *      Conversions (flags 0 = shared ZERO unless given, so a wrongly accepted request
 *      would show): GPA P+8 -> 1; 0 pages -> 1; flags 1<<5|1, 1<<5, 1<<31 -> 1;
 *      P + 0xffffffff pages (the pages register is 32 bits) -> 2; P up to one page
 *      past the end of RAM -> 2; one page at the end of RAM -> 2; 0xc0000000 (MMIO
 *      hole) -> 2; 0xfffffffffffff000 + 2 pages (overflow) -> 2.
 *      DMA at P: op 9 -> 1; length 0 -> 1; 2 MiB -> 1; 1 MiB + 1 -> 1; 1 MiB (allowed,
 *      but P is private) -> 4; GPA 0xc0000000 -> 2; GPA = end of RAM -> 2.
 *   convert: step <n> ok
 *   convert: step <n> FAIL <what>: expected 0x<hex> got 0x<hex>   (the step's first failure)
 *
 * Part B (every vCPU, only with 2+ vCPUs), concurrency. The pages after P are dealt
 * out in chunks of 4: chunk c belongs to vCPU c % nvcpus, so each vCPU owns up to 16
 * chunks (64 pages) and its chunks' edge pages neighbour other vCPUs' pages. Each vCPU
 * converts its slice private (ZERO), writes a pattern everywhere, then does ROUNDS
 * rounds: convert 1-4 pages of one chunk with a random target and mode; maybe write a
 * fresh pattern to the first of them, or DMA FILL it; DMA READ the pages before and
 * after (in its own slice), the first page, and the run with its neighbours inside the
 * chunk. A per-vCPU shadow (state and content of every page) predicts every result: a
 * conversion gives status 0 and leaves pages already in the target state as they are,
 * else zeros them (ZERO) or keeps them (PRESERVE); a DMA on a range with a private
 * page gives 4, else 0 and (READ) the byte sum of the shadow content. The guest reads
 * back every page it converted or filled. At the end every page is checked by the
 * guest and by DMA. vCPU 0 then prints
 *   convert: vcpus <n> conversions <requests> dma <requests> mismatches <n>
 *   convert: vcpu <i> first mismatch: <what> at 0x<gpa> expected 0x<hex> got 0x<hex>
 *                                                       (per vCPU with a mismatch)
 *
 * Finally "convert: ok" (exit 0) or "convert: FAIL" (exit 1). On a bad layout only
 *   convert: bad layout: <reason>
 *   convert: FAIL
 */
#include "mosaic.h"

#define SECRET_BASE   0x5ec7e70000ull
#define QWORDS        (PAGE_SIZE / 8)
#define ONES          0x0101010101010101ull
#define MIX           0x9e3779b97f4a7c15ull
#define MMIO_HOLE     0xc0000000ull
#define CHUNK_PAGES   4u
#define MAX_CHUNKS    16u /* per vCPU: 64 pages */
#define SLICE_MAX     (CHUNK_PAGES * MAX_CHUNKS)
#define ROUNDS        200u

/* ---- Page contents ---------------------------------------------------------- */

enum kind { K_FILL, K_SECRET, K_PATTERN };

struct content {
    uint64_t seed;  /* K_PATTERN */
    uint8_t kind;
    uint8_t byte;   /* K_FILL; 0 = zeros */
};

static const struct content ZEROS = { 0, K_FILL, 0 };
static const struct content SECRET = { 0, K_SECRET, 0 };

static inline uint64_t content_qword(const struct content *c, uint64_t i)
{
    switch (c->kind) {
    case K_SECRET:
        return SECRET_BASE + i;
    case K_PATTERN:
        return (c->seed + i) * MIX;
    default:
        return c->byte * ONES;
    }
}

static uint32_t qword_byte_sum(uint64_t q)
{
    uint32_t s = 0;

    for (unsigned b = 0; b < 8; b++)
        s += (q >> (8 * b)) & 0xff;
    return s;
}

/* Byte sum (wrapping u32) of a page holding c. */
static uint32_t content_sum(const struct content *c)
{
    uint32_t s = 0;

    for (uint64_t i = 0; i < QWORDS; i++)
        s += qword_byte_sum(content_qword(c, i));
    return s;
}

static __attribute__((noinline)) void write_page(uint64_t gpa, const struct content *c)
{
    volatile uint64_t *p = (volatile uint64_t *)gpa;

    for (uint64_t i = 0; i < QWORDS; i++)
        p[i] = content_qword(c, i);
}

/* QWORDS if the page at gpa holds c, else the first differing qword (read in *got). */
static __attribute__((noinline)) uint64_t check_page(uint64_t gpa, const struct content *c, uint64_t *got)
{
    const volatile uint64_t *p = (const volatile uint64_t *)gpa;

    for (uint64_t i = 0; i < QWORDS; i++) {
        uint64_t v = p[i];
        if (v != content_qword(c, i)) {
            *got = v;
            return i;
        }
    }
    return QWORDS;
}

/* The guest's own byte sum of the page at gpa. */
static uint32_t page_sum(uint64_t gpa)
{
    const volatile uint64_t *p = (const volatile uint64_t *)gpa;
    uint32_t s = 0;

    for (uint64_t i = 0; i < QWORDS; i++)
        s += qword_byte_sum(p[i]);
    return s;
}

/* ---- Layout (set by vCPU 0 before the first barrier) ------------------------ */

static uint64_t page_p;      /* P */
static uint64_t ram_end;     /* end of the last free range = end of guest RAM */
static uint64_t chunk_base;  /* first page after P: chunk 0 */
static uint32_t nr_chunks;   /* per vCPU */
static const char *bad_layout;
static struct barrier barrier;

static void set_bad_layout(const char *why)
{
    __atomic_store_n(&bad_layout, why, __ATOMIC_RELEASE);
}


/* NULL, or why vCPU 0 cannot run this program; fills in the layout. */
static const char *layout(uint32_t nvcpus, const struct boot_info *bi)
{
    if (!boot_info_valid(bi))
        return "invalid boot info";
    if (bi->nr_free == 0)
        return "no free RAM";
    if (nvcpus > MOSAIC_MAX_VCPUS)
        return "too many vcpus";
    if (free_overlaps(bi, 0, (uint64_t)__image_end))
        return "free range overlaps the system area or image";

    uint64_t pages = bi->free[0].len / PAGE_SIZE;
    uint64_t chunks = pages ? (pages - 1) / CHUNK_PAGES / nvcpus : 0;

    if (pages == 0 || (nvcpus >= 2 && chunks == 0))
        return "first free range too small";
    page_p = bi->free[0].gpa;
    ram_end = bi->free[bi->nr_free - 1].gpa + bi->free[bi->nr_free - 1].len;
    chunk_base = page_p + PAGE_SIZE;
    nr_chunks = chunks < MAX_CHUNKS ? (uint32_t)chunks : MAX_CHUNKS;
    return NULL;
}

static void check_layout(uint32_t vcpu, uint32_t nvcpus, const struct boot_info *bi)
{
    uint64_t sp = (uint64_t)__builtin_frame_address(0);
    const char *bad = vcpu == 0 ? layout(nvcpus, bi) : NULL;

    if (bad)
        set_bad_layout(bad);
    else if (boot_info_valid(bi) && free_overlaps(bi, sp - 4096, sp + 8)) /* up to the saved RBP */
        set_bad_layout("free range overlaps a vcpu stack");
}

/* ---- Part A ----------------------------------------------------------------- */

static uint32_t step_no;
static bool step_failed;
static uint32_t steps_failed;

static void step_begin(uint32_t n)
{
    step_no = n;
    step_failed = false;
}

static void step_end(void)
{
    if (step_failed) {
        steps_failed++;
        return;
    }
    print_str("convert: step ");
    print_u64(step_no);
    print_str(" ok\n");
}

/* Prints the step's FAIL line for its first failure; "<what>[ at P+0x<off>]: ...". */
static void fail(const char *what, int64_t off, uint64_t expected, uint64_t got, const char *hint)
{
    if (step_failed)
        return;
    step_failed = true;
    print_str("convert: step ");
    print_u64(step_no);
    print_str(" FAIL ");
    print_str(what);
    if (off >= 0) {
        print_str(" at P+0x");
        print_hex((uint64_t)off);
    }
    print_str(": expected 0x");
    print_hex(expected);
    print_str(" got 0x");
    print_hex(got);
    if (hint)
        print_str(hint);
    print_char('\n');
}

static bool expect(const char *what, uint64_t expected, uint64_t got)
{
    if (expected == got)
        return true;
    fail(what, -1, expected, got, NULL);
    return false;
}

static bool expect_page(const char *what, const struct content *c)
{
    uint64_t got = 0, i = check_page(page_p, c, &got);

    if (i == QWORDS)
        return true;
    fail(what, (int64_t)(i * 8), content_qword(c, i), got, NULL);
    return false;
}

#define CHECK(cond)        \
    do {                   \
        if (!(cond))       \
            return;        \
    } while (0)

static uint32_t dma_read_p(void)
{
    return dma_request(page_p, PAGE_SIZE, DMA_OP_READ);
}

static void step1(void)
{
    write_page(page_p, &SECRET);
    CHECK(expect_page("secret written to P", &SECRET));
}

static void step2(void)
{
    uint32_t st = dma_read_p();

    if (st != DMA_PRIVATE)
        fail("dma read of P status", -1, DMA_PRIVATE, st,
             st == DMA_OK ? " (P is shared: run with --memory size=...,private=on)" : NULL);
}

static void step3(void)
{
    CHECK(expect("convert to shared/ZERO status", CONVERT_OK, convert_pages(page_p, 1, 0)));
    CHECK(expect_page("P after shared/ZERO", &ZEROS));
    CHECK(expect("dma read of P status", DMA_OK, dma_read_p()));
    CHECK(expect("dma read of P sum", 0, dma_read_sum()));
}

static void step4(void)
{
    const struct content a5 = { 0, K_FILL, 0xa5 };

    CHECK(expect("dma fill of P status", DMA_OK, dma_request(page_p, PAGE_SIZE, DMA_OP_FILL | 0xa5u << 8)));
    CHECK(expect_page("P after dma fill 0xa5", &a5));
    CHECK(expect("dma read of P status", DMA_OK, dma_read_p()));
    CHECK(expect("dma read of P sum", 0xa5ull * PAGE_SIZE, dma_read_sum()));
}

static void step5(void)
{
    const struct content a5 = { 0, K_FILL, 0xa5 };

    CHECK(expect("convert to private/PRESERVE status", CONVERT_OK,
                 convert_pages(page_p, 1, CONVERT_PRIVATE | CONVERT_PRESERVE)));
    CHECK(expect_page("P after private/PRESERVE", &a5));
    CHECK(expect("dma read of P status", DMA_PRIVATE, dma_read_p()));
}

static void step6(void)
{
    write_page(page_p, &SECRET);
    CHECK(expect("convert to shared/PRESERVE status", CONVERT_OK, convert_pages(page_p, 1, CONVERT_PRESERVE)));
    CHECK(expect_page("P after shared/PRESERVE", &SECRET));

    uint32_t sum = page_sum(page_p);
    CHECK(expect("guest byte sum of P", content_sum(&SECRET), sum));
    CHECK(expect("dma read of P status", DMA_OK, dma_read_p()));
    CHECK(expect("dma read of P sum", sum, dma_read_sum()));
}

static void step7(void)
{
    CHECK(expect("convert to private/ZERO status", CONVERT_OK, convert_pages(page_p, 1, CONVERT_PRIVATE)));
    CHECK(expect_page("P after private/ZERO", &ZEROS));
    CHECK(expect("dma read of P status", DMA_PRIVATE, dma_read_p()));
}

/* After a refused request: P still private and still holding the secret. */
static bool unchanged(void)
{
    return expect_page("P after a refused request", &SECRET) &&
           expect("dma read of P after a refused request status", DMA_PRIVATE, dma_read_p());
}

struct bad_convert {
    const char *what;
    uint64_t gpa;
    uint32_t pages;
    uint32_t flags;
    uint32_t status;
};

struct bad_dma {
    const char *what;
    uint64_t gpa;
    uint32_t len;
    uint32_t doorbell;
    uint32_t status;
};

static void step8(void)
{
    uint64_t past_end = (ram_end - page_p) / PAGE_SIZE + 1; /* P .. one page past RAM */
    const struct bad_convert conv[] = {
        { "convert unaligned gpa P+8 status", page_p + 8, 1, 0, CONVERT_INVALID },
        { "convert 0 pages status", page_p, 0, 0, CONVERT_INVALID },
        { "convert flags 1<<5|1 status", page_p, 1, 1u << 5 | CONVERT_PRIVATE, CONVERT_INVALID },
        { "convert flags 1<<5 status", page_p, 1, 1u << 5, CONVERT_INVALID },
        { "convert flags 1<<31 status", page_p, 1, 1u << 31, CONVERT_INVALID },
        { "convert P +0xffffffff pages status", page_p, 0xffffffffu, 0, CONVERT_RANGE },
        { "convert P to one page past the end of RAM status", page_p,
          past_end > 0xffffffffu ? 0xffffffffu : (uint32_t)past_end, 0, CONVERT_RANGE },
        { "convert at the end of RAM status", ram_end, 1, 0, CONVERT_RANGE },
        { "convert in the MMIO hole status", MMIO_HOLE, 1, 0, CONVERT_RANGE },
        { "convert overflowing range status", 0xfffffffffffff000ull, 2, 0, CONVERT_RANGE },
    };
    const struct bad_dma dma[] = {
        { "dma op 9 status", page_p, PAGE_SIZE, 9, DMA_INVALID },
        { "dma length 0 status", page_p, 0, DMA_OP_READ, DMA_INVALID },
        { "dma length 2 MiB status", page_p, 2u << 20, DMA_OP_READ, DMA_INVALID },
        { "dma length 1 MiB + 1 status", page_p, DMA_MAX_LEN + 1, DMA_OP_READ, DMA_INVALID },
        { "dma fill length 2 MiB status", page_p, 2u << 20, DMA_OP_FILL | 0x5au << 8, DMA_INVALID },
        { "dma length 1 MiB (P private) status", page_p, DMA_MAX_LEN, DMA_OP_READ, DMA_PRIVATE },
        { "dma gpa 0xc0000000 status", MMIO_HOLE, PAGE_SIZE, DMA_OP_READ, DMA_RANGE },
        { "dma gpa at the end of RAM status", ram_end, PAGE_SIZE, DMA_OP_READ, DMA_RANGE },
    };

    write_page(page_p, &SECRET);
    CHECK(expect_page("secret written to P", &SECRET));
    for (size_t i = 0; i < sizeof(conv) / sizeof(conv[0]); i++) {
        const struct bad_convert *b = &conv[i];
        CHECK(expect(b->what, b->status, convert_pages(b->gpa, b->pages, b->flags)));
        CHECK(unchanged());
    }
    for (size_t i = 0; i < sizeof(dma) / sizeof(dma[0]); i++) {
        const struct bad_dma *b = &dma[i];
        CHECK(expect(b->what, b->status, dma_request(b->gpa, b->len, b->doorbell)));
        CHECK(unchanged());
    }
}

static void part_a(void)
{
    static void (*const steps[])(void) = { step1, step2, step3, step4, step5, step6, step7, step8 };

    for (uint32_t i = 0; i < sizeof(steps) / sizeof(steps[0]); i++) {
        step_begin(i + 1);
        steps[i]();
        step_end();
    }
}

/* ---- Part B ----------------------------------------------------------------- */

struct result {
    uint64_t conversions;
    uint64_t dma;
    uint64_t mismatches;
    const char *what; /* first mismatch */
    uint64_t gpa;
    uint64_t expected;
    uint64_t got;
} __attribute__((aligned(64))); /* one cache line per vCPU */

static struct result results[MOSAIC_MAX_VCPUS];

struct shadow {
    struct content c;
    uint32_t sum;   /* content_sum(&c) */
    bool priv;
};

struct slice {
    uint32_t vcpu, nvcpus, pages;
    uint64_t rng;
    struct result *r;
    struct shadow page[SLICE_MAX];
};


/* In [0, n), n > 0. */
static uint32_t below(struct slice *s, uint32_t n)
{
    return (uint32_t)(((unsigned __int128)xorshift64(&s->rng) * n) >> 64);
}

/* GPA of the vCPU's page k: chunk k / 4 of this vCPU is chunk (k / 4) * nvcpus + vcpu. */
static uint64_t gpa_of(const struct slice *s, uint32_t k)
{
    uint64_t chunk = (uint64_t)(k / CHUNK_PAGES) * s->nvcpus + s->vcpu;

    return chunk_base + (chunk * CHUNK_PAGES + k % CHUNK_PAGES) * PAGE_SIZE;
}

static void mismatch(struct slice *s, const char *what, uint64_t gpa, uint64_t expected, uint64_t got)
{
    if (!s->r->mismatches++) {
        s->r->what = what;
        s->r->gpa = gpa;
        s->r->expected = expected;
        s->r->got = got;
    }
}

static void set_content(struct slice *s, uint32_t k, const struct content *c)
{
    s->page[k].c = *c;
    s->page[k].sum = content_sum(c);
}

static void fresh_pattern(struct slice *s, uint32_t k)
{
    struct content c = { xorshift64(&s->rng), K_PATTERN, 0 };

    write_page(gpa_of(s, k), &c);
    set_content(s, k, &c);
}

/* The guest reads page k back and compares it with the shadow. */
static void verify_guest(struct slice *s, uint32_t k)
{
    uint64_t gpa = gpa_of(s, k), got = 0;
    uint64_t i = check_page(gpa, &s->page[k].c, &got);

    if (i != QWORDS)
        mismatch(s, "guest read", gpa + i * 8, content_qword(&s->page[k].c, i), got);
}

/* Converts pages [k, k + n) (one chunk) with `flags`; then the guest reads them. */
static void convert_run(struct slice *s, uint32_t k, uint32_t n, uint32_t flags)
{
    uint64_t gpa = gpa_of(s, k);
    uint32_t st = convert_pages(gpa, n, flags);
    bool priv = flags & CONVERT_PRIVATE;

    s->r->conversions++;
    if (st != CONVERT_OK) {
        mismatch(s, "convert status", gpa, CONVERT_OK, st);
        return;
    }
    for (uint32_t j = k; j < k + n; j++) {
        if (s->page[j].priv == priv)
            continue; /* already in the target state: left as it is, even with ZERO */
        s->page[j].priv = priv;
        if (!(flags & CONVERT_PRESERVE))
            set_content(s, j, &ZEROS);
    }
    for (uint32_t j = k; j < k + n; j++)
        verify_guest(s, j);
}

/* DMA READ of pages [k, k + n), contiguous in guest-physical memory. */
static void dma_read_run(struct slice *s, uint32_t k, uint32_t n)
{
    uint64_t gpa = gpa_of(s, k);
    uint32_t expected = DMA_OK, sum = 0;

    for (uint32_t j = k; j < k + n; j++) {
        if (s->page[j].priv)
            expected = DMA_PRIVATE;
        sum += s->page[j].sum;
    }
    uint32_t st = dma_request(gpa, n * (uint32_t)PAGE_SIZE, DMA_OP_READ);
    s->r->dma++;
    if (st != expected)
        mismatch(s, "dma read status", gpa, expected, st);
    else if (st == DMA_OK && dma_read_sum() != sum)
        mismatch(s, "dma read sum", gpa, sum, dma_read_sum());
}

static void dma_fill(struct slice *s, uint32_t k, uint8_t byte)
{
    uint64_t gpa = gpa_of(s, k);
    uint32_t expected = s->page[k].priv ? DMA_PRIVATE : DMA_OK;
    uint32_t st = dma_request(gpa, PAGE_SIZE, DMA_OP_FILL | (uint32_t)byte << 8);

    s->r->dma++;
    if (st != expected)
        mismatch(s, "dma fill status", gpa, expected, st);
    if (st == DMA_OK) {
        /* Follow memory even after a wrong OK, so one fault is counted once. */
        const struct content c = { 0, K_FILL, byte };
        set_content(s, k, &c);
    }
    verify_guest(s, k);
}

static void part_b(struct slice *s)
{
    uint32_t chunks = nr_chunks;

    s->pages = chunks * CHUNK_PAGES;
    s->rng = (0x2545f4914f6cdd1dull ^ ((uint64_t)s->vcpu * MIX)) | 1;

    /* Start: every page private (ZERO: pages already private stay as they are), then
     * a known pattern everywhere. */
    for (uint32_t c = 0; c < chunks; c++) {
        uint64_t gpa = gpa_of(s, c * CHUNK_PAGES);
        uint32_t st = convert_pages(gpa, CHUNK_PAGES, CONVERT_PRIVATE);

        s->r->conversions++;
        if (st != CONVERT_OK)
            mismatch(s, "initial convert status", gpa, CONVERT_OK, st);
    }
    for (uint32_t k = 0; k < s->pages; k++) {
        s->page[k].priv = true;
        fresh_pattern(s, k);
    }
    for (uint32_t c = 0; c < chunks; c++)
        dma_read_run(s, c * CHUNK_PAGES, CHUNK_PAGES);

    barrier_wait(&barrier, s->nvcpus); /* start the rounds together */

    for (uint32_t round = 0; round < ROUNDS; round++) {
        uint32_t k = below(s, s->pages);
        uint32_t first = k - k % CHUNK_PAGES, end = first + CHUNK_PAGES; /* k's chunk */
        uint32_t n = below(s, 4) ? 1 : 2 + below(s, CHUNK_PAGES - 1);

        if (n > end - k)
            n = end - k;
        convert_run(s, k, n, below(s, 4));

        switch (below(s, 4)) {
        case 0:
            fresh_pattern(s, k); /* private or shared: the guest may write either */
            break;
        case 1:
            dma_fill(s, k, (uint8_t)(1 + below(s, 255)));
            break;
        default:
            break;
        }

        if (k > 0)
            dma_read_run(s, k - 1, 1);
        dma_read_run(s, k, 1);
        if (k + n < s->pages)
            dma_read_run(s, k + n, 1);
        uint32_t lo = k > first ? k - 1 : k, hi = k + n < end ? k + n + 1 : end;
        dma_read_run(s, lo, hi - lo);
    }

    for (uint32_t k = 0; k < s->pages; k++) {
        verify_guest(s, k);
        dma_read_run(s, k, 1);
    }
}

static bool report_b(uint32_t nvcpus)
{
    uint64_t conversions = 0, dma = 0, mismatches = 0;

    for (uint32_t i = 0; i < nvcpus; i++) {
        conversions += results[i].conversions;
        dma += results[i].dma;
        mismatches += results[i].mismatches;
    }
    print_str("convert: vcpus ");
    print_u64(nvcpus);
    print_str(" conversions ");
    print_u64(conversions);
    print_str(" dma ");
    print_u64(dma);
    print_str(" mismatches ");
    print_u64(mismatches);
    print_char('\n');
    for (uint32_t i = 0; i < nvcpus; i++) {
        const struct result *r = &results[i];
        if (!r->mismatches)
            continue;
        print_str("convert: vcpu ");
        print_u64(i);
        print_str(" first mismatch: ");
        print_str(r->what);
        print_str(" at 0x");
        print_hex(r->gpa);
        print_str(" expected 0x");
        print_hex(r->expected);
        print_str(" got 0x");
        print_hex(r->got);
        print_char('\n');
    }
    return mismatches == 0;
}

/* ---- Entry ------------------------------------------------------------------ */

int guest_main(uint32_t vcpu, uint32_t nvcpus, const struct boot_info *bi)
{
    boot_marker();
    check_layout(vcpu, nvcpus, bi);
    if (vcpu == 0 && !__atomic_load_n(&bad_layout, __ATOMIC_ACQUIRE))
        part_a();
    barrier_wait(&barrier, nvcpus);

    const char *bad = __atomic_load_n(&bad_layout, __ATOMIC_ACQUIRE);
    if (bad) {
        if (vcpu != 0)
            return 0;
        print_str("convert: bad layout: ");
        print_str(bad);
        print_str("\nconvert: FAIL\n");
        return 1;
    }

    bool ok = true;
    if (nvcpus >= 2) {
        struct slice s = { .vcpu = vcpu, .nvcpus = nvcpus, .r = &results[vcpu] };

        part_b(&s);
        barrier_wait(&barrier, nvcpus);
        if (vcpu != 0)
            return 0;
        ok = report_b(nvcpus);
    }
    ok = ok && steps_failed == 0;
    print_str(ok ? "convert: ok\n" : "convert: FAIL\n");
    return ok ? 0 : 1;
}
