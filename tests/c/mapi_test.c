/*
 * mapi_test.c: SPEC.md's behaviour table, row by row, from C, then the threaded cases.
 *
 * Built and run by tests/c_abi.rs (cargo test --test c_abi), and under valgrind by
 * .ci/c-valgrind.sh. Every check compares mapialloc_stats() snapshots taken while no other
 * thread is inside the allocator, so the deltas are exact.
 *
 * Usage: mapi_test [--threads N]
 *   --threads N  number of short-lived threads (default 2000)
 * Environment: MAPIALLOC_TEST_UNDER_VALGRIND=1 skips the RSS bound and the address-space
 * limit (valgrind owns both).
 */
#define _GNU_SOURCE
#include "mapialloc.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

/* ---- checking ---------------------------------------------------------------------- */

static atomic_int failures;
static atomic_long checks;

#define CHECK(cond)                                                                        \
    do {                                                                                   \
        atomic_fetch_add(&checks, 1);                                                      \
        if (!(cond)) {                                                                     \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);       \
            atomic_fetch_add(&failures, 1);                                                \
        }                                                                                  \
    } while (0)

#define CHECK_SC(expr, want)                                                               \
    do {                                                                                   \
        SCODE got_ = (expr);                                                               \
        atomic_fetch_add(&checks, 1);                                                      \
        if (got_ != (want)) {                                                              \
            fprintf(stderr, "%s:%d: %s returned 0x%08X, want 0x%08X\n", __FILE__, __LINE__, \
                    #expr, (unsigned)got_, (unsigned)(want));                              \
            atomic_fetch_add(&failures, 1);                                                \
        }                                                                                  \
    } while (0)

/* A value no allocator returns, to see that failures overwrite the out pointer. */
#define SENTINEL ((LPVOID)(uintptr_t)0x5a5a5a50u)

static int under_valgrind;

static struct mapialloc_stats snap(void) {
    struct mapialloc_stats s;
    memset(&s, 0xff, sizeof s);
    CHECK_SC(mapialloc_stats(&s), S_OK);
    return s;
}

/* Counter deltas: the live counts and every misuse counter. */
#define DELTA(after, before, field) ((int64_t)((after).field - (before).field))

static void check_live_delta(const struct mapialloc_stats *before, int64_t roots,
                             int64_t blocks, const char *where) {
    struct mapialloc_stats now = snap();
    if (DELTA(now, *before, live_roots) != roots || DELTA(now, *before, live_blocks) != blocks) {
        fprintf(stderr, "%s: live roots/blocks moved by %lld/%lld, want %lld/%lld\n", where,
                (long long)DELTA(now, *before, live_roots),
                (long long)DELTA(now, *before, live_blocks), (long long)roots, (long long)blocks);
        atomic_fetch_add(&failures, 1);
    }
    atomic_fetch_add(&checks, 1);
}

static int aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

/* Fills / verifies a block with a pattern derived from a tag, so overlaps show. */
static void fill(void *p, size_t n, uint32_t tag) {
    unsigned char *b = p;
    for (size_t i = 0; i < n; i++) b[i] = (unsigned char)(tag * 131u + i * 7u);
}
static int intact(const void *p, size_t n, uint32_t tag) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        if (b[i] != (unsigned char)(tag * 131u + i * 7u)) return 0;
    return 1;
}

static LPVOID new_root(ULONG n) {
    LPVOID p = SENTINEL;
    CHECK_SC(MAPIAllocateBuffer(n, &p), S_OK);
    CHECK(p != NULL && p != SENTINEL);
    return p;
}
static LPVOID new_linked(ULONG n, LPVOID root) {
    LPVOID p = SENTINEL;
    CHECK_SC(MAPIAllocateMore(n, root, &p), S_OK);
    CHECK(p != NULL && p != SENTINEL);
    return p;
}

/* ---- the rows of SPEC.md ----------------------------------------------------------- */

/* MAPIAllocateBuffer(n, &p): S_OK, 16-byte aligned, usable for n bytes, no overlap. */
static void row_allocate_buffer(void) {
    static const ULONG sizes[] = {1, 7, 15, 16, 17, 100, 1000, 4096, 65536, 1u << 20, 3u << 20};
    enum { N = sizeof sizes / sizeof sizes[0] };
    LPVOID p[N];
    struct mapialloc_stats before = snap();
    for (int i = 0; i < N; i++) {
        p[i] = new_root(sizes[i]);
        CHECK(aligned16(p[i]));
        fill(p[i], sizes[i], (uint32_t)i);
    }
    for (int i = 0; i < N; i++) CHECK(intact(p[i], sizes[i], (uint32_t)i));
    check_live_delta(&before, N, N, "allocate_buffer");
    for (int i = 0; i < N; i++) CHECK(MAPIFreeBuffer(p[i]) == 0);
    check_live_delta(&before, 0, 0, "allocate_buffer freed");
}

/* cbSize == 0: S_OK, a unique non-NULL pointer, freed or linked to like any other. */
static void row_zero_size(void) {
    struct mapialloc_stats before = snap();
    LPVOID a = new_root(0), b = new_root(0);
    CHECK(a != b && aligned16(a) && aligned16(b));
    LPVOID l0 = new_linked(0, a), l1 = new_linked(32, a);
    CHECK(l0 != l1 && l0 != a && l0 != b && aligned16(l0) && aligned16(l1));
    fill(l1, 32, 9);
    CHECK(intact(l1, 32, 9));
    check_live_delta(&before, 2, 4, "zero size");
    CHECK(MAPIFreeBuffer(a) == 0);
    check_live_delta(&before, 1, 1, "zero size root a freed with its chain");
    CHECK(MAPIFreeBuffer(b) == 0);
    check_live_delta(&before, 0, 0, "zero size freed");
}

/* cbSize near 0xFFFFFFFF: MAPI_E_NOT_ENOUGH_MEMORY, *lppBuffer NULL, nothing allocated. */
static void row_huge_sizes(void) {
    static const ULONG sizes[] = {0xFFFFFFFFu, 0xFFFFFFFEu, 0xFFFFFFF0u, 0xFFFFFFFFu - 16,
                                  0xFFFFFFFFu - 32, 0xFFFFFFFFu - 4096};
    LPVOID root = new_root(8);
    struct mapialloc_stats before = snap();
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        LPVOID p = SENTINEL;
        CHECK_SC(MAPIAllocateBuffer(sizes[i], &p), MAPI_E_NOT_ENOUGH_MEMORY);
        CHECK(p == NULL);
        p = SENTINEL;
        CHECK_SC(MAPIAllocateMore(sizes[i], root, &p), MAPI_E_NOT_ENOUGH_MEMORY);
        CHECK(p == NULL);
    }
    check_live_delta(&before, 0, 0, "huge sizes");
    /* The root is still intact and usable after the failed links. */
    LPVOID l = new_linked(8, root);
    check_live_delta(&before, 0, 1, "link after huge sizes");
    (void)l;
    CHECK(MAPIFreeBuffer(root) == 0);
}

/* More than the process can get: in a child whose address space is capped. */
static void row_more_than_the_process_can_get(void) {
    if (under_valgrind) {
        printf("skip more_than_the_process_can_get (valgrind manages the address space)\n");
        return;
    }
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        struct rlimit cap = {256u << 20, 256u << 20};
        long vsize_pages = 0;
        FILE *f = fopen("/proc/self/statm", "r");
        if (f != NULL) {
            if (fscanf(f, "%ld", &vsize_pages) != 1) vsize_pages = 0;
            fclose(f);
        }
        cap.rlim_cur = cap.rlim_max = (rlim_t)vsize_pages * (rlim_t)sysconf(_SC_PAGESIZE) +
                                      (64u << 20);
        if (setrlimit(RLIMIT_AS, &cap) != 0) _exit(3);
        LPVOID p = SENTINEL, root = SENTINEL;
        if (MAPIAllocateBuffer(1024u << 20, &p) != MAPI_E_NOT_ENOUGH_MEMORY || p != NULL)
            _exit(1);
        SCODE sc = MAPIAllocateBuffer(64, &root);
        if (sc != S_OK) /* a small root may fail too under the cap, but only properly */
            _exit(sc == MAPI_E_NOT_ENOUGH_MEMORY && root == NULL ? 0 : 4);
        p = SENTINEL;
        if (MAPIAllocateMore(1024u << 20, root, &p) != MAPI_E_NOT_ENOUGH_MEMORY || p != NULL)
            _exit(2);
        MAPIFreeBuffer(root);
        _exit(0);
    }
    int status = -1;
    CHECK(pid > 0 && waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        fprintf(stderr, "capped child: status 0x%x\n", (unsigned)status);
}

/* lppBuffer == NULL: MAPI_E_INVALID_PARAMETER, nothing allocated. */
static void row_null_out_pointer(void) {
    LPVOID root = new_root(16);
    struct mapialloc_stats before = snap();
    CHECK_SC(MAPIAllocateBuffer(16, NULL), MAPI_E_INVALID_PARAMETER);
    CHECK_SC(MAPIAllocateBuffer(0, NULL), MAPI_E_INVALID_PARAMETER);
    CHECK_SC(MAPIAllocateMore(16, root, NULL), MAPI_E_INVALID_PARAMETER);
    CHECK_SC(MAPIAllocateMore(16, NULL, NULL), MAPI_E_INVALID_PARAMETER);
    CHECK_SC(mapialloc_stats(NULL), MAPI_E_INVALID_PARAMETER);
    check_live_delta(&before, 0, 0, "NULL out pointer");
    CHECK(MAPIFreeBuffer(root) == 0);
}

/* MAPIAllocateMore(n, root, &p): S_OK, 16-aligned, freed with the root in one call. */
static void row_allocate_more(void) {
    enum { LINKS = 200, LONG_CHAIN = 10000 };
    LPVOID linked[LINKS];
    struct mapialloc_stats before = snap();
    LPVOID root = new_root(64);
    fill(root, 64, 1000);
    for (int i = 0; i < LINKS; i++) {
        ULONG n = (ULONG)(i * 37 % 3000);
        linked[i] = new_linked(n, root);
        CHECK(aligned16(linked[i]));
        fill(linked[i], n, (uint32_t)i);
    }
    for (int i = 0; i < LINKS; i++) CHECK(intact(linked[i], (size_t)(i * 37 % 3000), (uint32_t)i));
    CHECK(intact(root, 64, 1000));
    check_live_delta(&before, 1, 1 + LINKS, "allocate_more");
    CHECK(MAPIFreeBuffer(root) == 0);
    check_live_delta(&before, 0, 0, "allocate_more freed with the root");

    /* A long chain: every link succeeds and one free releases them all. */
    root = new_root(8);
    for (int i = 0; i < LONG_CHAIN; i++) {
        LPVOID p = SENTINEL;
        if (MAPIAllocateMore(24, root, &p) != S_OK || p == NULL) {
            CHECK(!"link in a long chain");
            break;
        }
    }
    check_live_delta(&before, 1, 1 + LONG_CHAIN, "long chain");
    CHECK(MAPIFreeBuffer(root) == 0);
    check_live_delta(&before, 0, 0, "long chain freed");
}

/* lpObject == NULL: MAPI_E_INVALID_PARAMETER, counted. */
static void row_null_parent(void) {
    struct mapialloc_stats before = snap();
    LPVOID p = SENTINEL;
    CHECK_SC(MAPIAllocateMore(16, NULL, &p), MAPI_E_INVALID_PARAMETER);
    CHECK(p == NULL);
    struct mapialloc_stats after = snap();
    CHECK(DELTA(after, before, bad_parents) == 1);
    check_live_delta(&before, 0, 0, "NULL parent");
}

/* lpObject is a linked block: MAPI_E_INVALID_PARAMETER, counted, no corruption. */
static void row_linked_parent(void) {
    struct mapialloc_stats before = snap();
    LPVOID root = new_root(48);
    LPVOID l = new_linked(48, root);
    fill(root, 48, 1);
    fill(l, 48, 2);
    LPVOID p = SENTINEL;
    CHECK_SC(MAPIAllocateMore(16, l, &p), MAPI_E_INVALID_PARAMETER);
    CHECK(p == NULL);
    CHECK(intact(root, 48, 1) && intact(l, 48, 2));
    struct mapialloc_stats after = snap();
    CHECK(DELTA(after, before, bad_parents) == 1);
    check_live_delta(&before, 1, 2, "linked parent");
    (void)new_linked(16, root); /* the root still links */
    CHECK(MAPIFreeBuffer(root) == 0);
    check_live_delta(&before, 0, 0, "linked parent's root freed");
}

/* lpObject already freed: MAPI_E_INVALID_PARAMETER, counted, nothing leaked. */
static void row_freed_parent(void) {
    LPVOID keeper = new_root(32); /* keeps the page in use */
    struct mapialloc_stats before = snap();
    LPVOID root = new_root(32);
    (void)new_linked(32, root);
    CHECK(MAPIFreeBuffer(root) == 0);
    LPVOID p = SENTINEL;
    CHECK_SC(MAPIAllocateMore(16, root, &p), MAPI_E_INVALID_PARAMETER);
    CHECK(p == NULL);
    struct mapialloc_stats after = snap();
    CHECK(DELTA(after, before, bad_parents) == 1);
    check_live_delta(&before, 0, 0, "freed parent");
    CHECK(MAPIFreeBuffer(keeper) == 0);
}

/* Memory that is not the allocator's, for the foreign-pointer rows. */
static unsigned char static_area[256];

/* lpObject not from this allocator: MAPI_E_INVALID_PARAMETER, counted, nothing touched. */
static void row_foreign_parent(void) {
    unsigned char stack_area[256];
    unsigned char *heap_area = malloc(256);
    LPVOID root = new_root(512);
    CHECK(heap_area != NULL);
    fill(stack_area, sizeof stack_area, 3);
    fill(heap_area, 256, 4);
    fill(static_area, sizeof static_area, 5);
    fill(root, 512, 6);
    struct mapialloc_stats before = snap();
    LPVOID foreign[] = {
        stack_area + 64, heap_area + 64, static_area + 64,
        (unsigned char *)root + 16, /* inside a root, not at a block start */
        (unsigned char *)root + 8,  (unsigned char *)root + 1,
        (LPVOID)(uintptr_t)16,      /* the first page, never mapped */
    };
    enum { N = sizeof foreign / sizeof foreign[0] };
    for (int i = 0; i < N; i++) {
        LPVOID p = SENTINEL;
        CHECK_SC(MAPIAllocateMore(16, foreign[i], &p), MAPI_E_INVALID_PARAMETER);
        CHECK(p == NULL);
    }
    struct mapialloc_stats after = snap();
    CHECK(DELTA(after, before, bad_parents) == N);
    check_live_delta(&before, 0, 0, "foreign parents");
    CHECK(intact(stack_area, sizeof stack_area, 3) && intact(heap_area, 256, 4));
    CHECK(intact(static_area, sizeof static_area, 5) && intact(root, 512, 6));
    free(heap_area);
    CHECK(MAPIFreeBuffer(root) == 0);
}

/* MAPIFreeBuffer(NULL): 0, nothing touched. */
static void row_free_null(void) {
    struct mapialloc_stats before = snap();
    CHECK(MAPIFreeBuffer(NULL) == 0);
    struct mapialloc_stats after = snap();
    CHECK(memcmp(&before, &after, sizeof before) == 0);
}

/* MAPIFreeBuffer(linked block): 0, nothing freed, counted. */
static void row_free_linked(void) {
    struct mapialloc_stats before = snap();
    LPVOID root = new_root(40);
    LPVOID l = new_linked(40, root);
    fill(l, 40, 7);
    CHECK(MAPIFreeBuffer(l) == 0);
    struct mapialloc_stats after = snap();
    CHECK(DELTA(after, before, linked_frees) == 1);
    check_live_delta(&before, 1, 2, "free of a linked block");
    CHECK(intact(l, 40, 7));
    CHECK(MAPIFreeBuffer(root) == 0);
    check_live_delta(&before, 0, 0, "linked block freed with its root");
}

/* Double free, address not yet reused: 0, nothing freed twice, counted. */
static void row_double_free(void) {
    LPVOID keeper = new_root(24); /* keeps the page in use */
    struct mapialloc_stats before = snap();
    LPVOID root = new_root(24);
    (void)new_linked(24, root);
    (void)new_linked(24, root);
    CHECK(MAPIFreeBuffer(root) == 0);
    check_live_delta(&before, 0, 0, "first free");
    CHECK(MAPIFreeBuffer(root) == 0);
    CHECK(MAPIFreeBuffer(root) == 0);
    struct mapialloc_stats after = snap();
    CHECK(DELTA(after, before, double_frees) == 2);
    check_live_delta(&before, 0, 0, "double free");
    CHECK(MAPIFreeBuffer(keeper) == 0);
}

/* A pointer not from this allocator: 0, nothing touched, counted. */
static void row_free_foreign(void) {
    unsigned char stack_area[128];
    unsigned char *heap_area = malloc(128);
    LPVOID root = new_root(512);
    CHECK(heap_area != NULL);
    fill(stack_area, sizeof stack_area, 11);
    fill(heap_area, 128, 12);
    fill(static_area, sizeof static_area, 13);
    fill(root, 512, 14);
    struct mapialloc_stats before = snap();
    LPVOID foreign[] = {
        stack_area + 32,  heap_area,  heap_area + 32, static_area + 32,
        (unsigned char *)root + 16, (unsigned char *)root + 8, (unsigned char *)root + 1,
        (LPVOID)(uintptr_t)16,
    };
    enum { N = sizeof foreign / sizeof foreign[0] };
    for (int i = 0; i < N; i++) CHECK(MAPIFreeBuffer(foreign[i]) == 0);
    struct mapialloc_stats after = snap();
    CHECK(DELTA(after, before, foreign_frees) == N);
    check_live_delta(&before, 0, 0, "foreign frees");
    CHECK(intact(stack_area, sizeof stack_area, 11) && intact(heap_area, 128, 12));
    CHECK(intact(static_area, sizeof static_area, 13) && intact(root, 512, 14));
    free(heap_area); /* still malloc's, untouched */
    CHECK(MAPIFreeBuffer(root) == 0);
    check_live_delta(&before, -1, -1, "the root freed after foreign frees");
}

/* The provider triple: the same functions, interchangeable with the direct exports. */
static void row_triple(void) {
    LPALLOCATEBUFFER ab = NULL;
    LPALLOCATEMORE am = NULL;
    LPFREEBUFFER fb = NULL;
    CHECK_SC(mapialloc_mem_alloc_routines(&ab, &am, &fb), S_OK);
    CHECK(ab != NULL && am != NULL && fb != NULL);
    if (ab == NULL || am == NULL || fb == NULL) return;

    struct mapialloc_stats before = snap();
    LPVOID a = SENTINEL, b = SENTINEL, l = SENTINEL;
    CHECK_SC(ab(32, &a), S_OK);       /* root through the triple */
    CHECK_SC(MAPIAllocateMore(32, a, &l), S_OK); /* linked directly */
    CHECK_SC(MAPIAllocateBuffer(32, &b), S_OK);  /* root directly */
    CHECK_SC(am(32, b, &l), S_OK);    /* linked through the triple */
    check_live_delta(&before, 2, 4, "triple");
    CHECK(fb(a) == 0);                /* freed through the triple */
    CHECK(MAPIFreeBuffer(b) == 0);    /* freed directly */
    check_live_delta(&before, 0, 0, "triple freed");
    LPVOID p = SENTINEL;
    CHECK_SC(am(8, NULL, &p), MAPI_E_INVALID_PARAMETER);
    CHECK(p == NULL);

    /* A NULL out pointer fails the call and NULLs the others. */
    LPALLOCATEBUFFER ab2 = MAPIAllocateBuffer;
    LPALLOCATEMORE am2 = MAPIAllocateMore;
    LPFREEBUFFER fb2 = MAPIFreeBuffer;
    CHECK_SC(mapialloc_mem_alloc_routines(&ab2, NULL, &fb2), MAPI_E_INVALID_PARAMETER);
    CHECK(ab2 == NULL && fb2 == NULL);
    CHECK_SC(mapialloc_mem_alloc_routines(NULL, &am2, NULL), MAPI_E_INVALID_PARAMETER);
    CHECK(am2 == NULL);
    CHECK_SC(mapialloc_mem_alloc_routines(NULL, NULL, NULL), MAPI_E_INVALID_PARAMETER);
}

/* ---- threads ----------------------------------------------------------------------- */

static void start(pthread_t *t, void *(*fn)(void *), void *arg) {
    if (pthread_create(t, NULL, fn, arg) != 0) {
        perror("pthread_create");
        exit(2);
    }
}
static void join(pthread_t t) {
    if (pthread_join(t, NULL) != 0) {
        perror("pthread_join");
        exit(2);
    }
}

/* Four threads link to one root at once; every block is distinct and freed with the root. */
enum { LINKERS = 4, LINKS_EACH = 10000 };
struct linker {
    LPVOID root;
    pthread_barrier_t *go;
    uint32_t id;
    LPVOID blocks[LINKS_EACH];
};
static ULONG link_size(uint32_t id, int i) { return (ULONG)(8 + (id * 13 + (uint32_t)i) % 120); }

static void *link_many(void *arg) {
    struct linker *w = arg;
    pthread_barrier_wait(w->go);
    for (int i = 0; i < LINKS_EACH; i++) {
        LPVOID p = NULL;
        CHECK_SC(MAPIAllocateMore(link_size(w->id, i), w->root, &p), S_OK);
        w->blocks[i] = p;
        if (p != NULL) fill(p, link_size(w->id, i), w->id * LINKS_EACH + (uint32_t)i);
    }
    return NULL;
}
static void *free_root_of(void *arg) {
    struct linker *w = arg;
    CHECK(MAPIFreeBuffer(w->root) == 0);
    return NULL;
}

static void threads_link_to_one_root(void) {
    static struct linker w[LINKERS];
    pthread_t t[LINKERS];
    pthread_barrier_t go;
    pthread_barrier_init(&go, NULL, LINKERS);
    struct mapialloc_stats before = snap();
    LPVOID root = new_root(100);
    for (uint32_t i = 0; i < LINKERS; i++) {
        w[i].root = root;
        w[i].go = &go;
        w[i].id = i;
        start(&t[i], link_many, &w[i]);
    }
    for (int i = 0; i < LINKERS; i++) join(t[i]);
    pthread_barrier_destroy(&go);
    long damaged = 0;
    for (uint32_t i = 0; i < LINKERS; i++)
        for (int j = 0; j < LINKS_EACH; j++)
            if (w[i].blocks[j] == NULL || !aligned16(w[i].blocks[j]) ||
                !intact(w[i].blocks[j], link_size(i, j), i * LINKS_EACH + (uint32_t)j))
                damaged++;
    CHECK(damaged == 0);
    check_live_delta(&before, 1, 1 + LINKERS * LINKS_EACH, "4 threads linked to one root");
    /* The root is freed by a fifth thread. */
    pthread_t freer;
    start(&freer, free_root_of, &w[0]);
    join(freer);
    check_live_delta(&before, 0, 0, "root of 4 linkers freed on another thread");
}

/* Roots allocated on one thread and freed on another: each thread frees its neighbour's. */
enum { ROTATORS = 4, ROOTS_EACH = 5000, ROUNDS = 4 };
struct rotator {
    uint32_t id;
    pthread_barrier_t *phase;
    LPVOID (*roots)[ROOTS_EACH]; /* roots[ROTATORS][ROOTS_EACH] */
};
static void *rotate(void *arg) {
    struct rotator *r = arg;
    for (int round = 0; round < ROUNDS; round++) {
        for (int i = 0; i < ROOTS_EACH; i++) {
            LPVOID root = NULL;
            CHECK_SC(MAPIAllocateBuffer((ULONG)(16 + i % 500), &root), S_OK);
            for (int k = 0; k < i % 4 && root != NULL; k++) {
                LPVOID l = NULL;
                CHECK_SC(MAPIAllocateMore((ULONG)(8 + k * 40), root, &l), S_OK);
            }
            r->roots[r->id][i] = root;
        }
        pthread_barrier_wait(r->phase);
        uint32_t neighbour = (r->id + 1 + (uint32_t)round % (ROTATORS - 1)) % ROTATORS;
        for (int i = 0; i < ROOTS_EACH; i++) CHECK(MAPIFreeBuffer(r->roots[neighbour][i]) == 0);
        pthread_barrier_wait(r->phase);
    }
    return NULL;
}
static void threads_free_roots_of_others(void) {
    static LPVOID roots[ROTATORS][ROOTS_EACH];
    struct rotator r[ROTATORS];
    pthread_t t[ROTATORS];
    pthread_barrier_t phase;
    pthread_barrier_init(&phase, NULL, ROTATORS);
    struct mapialloc_stats before = snap();
    for (uint32_t i = 0; i < ROTATORS; i++) {
        r[i] = (struct rotator){i, &phase, roots};
        start(&t[i], rotate, &r[i]);
    }
    for (int i = 0; i < ROTATORS; i++) join(t[i]);
    pthread_barrier_destroy(&phase);
    struct mapialloc_stats after = snap();
    check_live_delta(&before, 0, 0, "roots freed on other threads");
    CHECK(DELTA(after, before, double_frees) == 0 && DELTA(after, before, foreign_frees) == 0);
}

/* Two threads race to free the same roots: exactly one frees each, the other is counted. */
enum { RACED_ROOTS = 20000 };
struct racer {
    LPVOID *roots;
    pthread_barrier_t *go;
    int reverse;
};
static void *free_all(void *arg) {
    struct racer *r = arg;
    pthread_barrier_wait(r->go);
    for (int k = 0; k < RACED_ROOTS; k++) {
        int i = r->reverse ? RACED_ROOTS - 1 - k : k;
        CHECK(MAPIFreeBuffer(r->roots[2 * i]) == 0); /* the even roots */
    }
    return NULL;
}
static void threads_race_to_free(void) {
    /* Twice as many roots as raced: the odd ones stay live, so every page keeps a live
     * block and the loser of each race finds a freed root, not returned memory. */
    static LPVOID roots[2 * RACED_ROOTS];
    for (int round = 0; round < 2; round++) {
        struct mapialloc_stats before = snap();
        for (int i = 0; i < 2 * RACED_ROOTS; i++) {
            roots[i] = new_root((ULONG)(8 + i % 64));
            if (i % 3 == 0) (void)new_linked(16, roots[i]);
        }
        struct mapialloc_stats allocated = snap();
        pthread_barrier_t go;
        pthread_barrier_init(&go, NULL, 2);
        struct racer a = {roots, &go, 0}, b = {roots, &go, round == 1};
        pthread_t ta, tb;
        start(&ta, free_all, &a);
        start(&tb, free_all, &b);
        join(ta);
        join(tb);
        pthread_barrier_destroy(&go);
        struct mapialloc_stats after = snap();
        CHECK(DELTA(after, allocated, live_roots) == -RACED_ROOTS);
        CHECK(DELTA(after, allocated, double_frees) == RACED_ROOTS);
        CHECK(DELTA(after, allocated, foreign_frees) == 0);
        for (int i = 1; i < 2 * RACED_ROOTS; i += 2) CHECK(MAPIFreeBuffer(roots[i]) == 0);
        check_live_delta(&before, 0, 0, "racing frees");
    }
}

/* MAPIAllocateMore racing MAPIFreeBuffer on the same root: a link either lands before the
 * free and is freed with the chain, or fails with MAPI_E_INVALID_PARAMETER; none leaks. */
struct link_race {
    LPVOID root;
    atomic_long linked;
    long failed_code_mismatch;
};
static void *link_until_refused(void *arg) {
    struct link_race *r = arg;
    for (;;) {
        LPVOID p = SENTINEL;
        SCODE sc = MAPIAllocateMore(32, r->root, &p);
        if (sc != S_OK) {
            if (sc != MAPI_E_INVALID_PARAMETER || p != NULL) r->failed_code_mismatch++;
            return NULL;
        }
        atomic_fetch_add(&r->linked, 1);
    }
}
static void threads_free_races_link(void) {
    LPVOID keeper = new_root(32);
    struct mapialloc_stats before = snap();
    for (int round = 0; round < 200; round++) {
        struct link_race r = {new_root(32), 0, 0};
        pthread_t linker;
        start(&linker, link_until_refused, &r);
        while (atomic_load(&r.linked) < 1 + round % 50) sched_yield();
        CHECK(MAPIFreeBuffer(r.root) == 0);
        join(linker);
        CHECK(r.failed_code_mismatch == 0);
    }
    struct mapialloc_stats after = snap();
    CHECK(DELTA(after, before, bad_parents) == 200);
    check_live_delta(&before, 0, 0, "links racing frees");
    CHECK(MAPIFreeBuffer(keeper) == 0);
}

/* 2,000 short-lived threads: each allocates, frees half, hands half to the main thread.
 * Pages of exited threads must be reused or returned, so memory stays bounded: the peak of
 * the second half of the run is no higher than the peak of the first half (after a
 * warm-up) plus a margin, where an engine that kept each exited thread's pages would grow
 * by the thread count times its footprint. */
enum { WAVE = 8, ROOTS_PER_THREAD = 64, KEPT_PER_THREAD = ROOTS_PER_THREAD / 2 };
enum { GROWTH_MARGIN_KIB = 16 * 1024 };
struct short_lived {
    uint32_t id;
    LPVOID kept[KEPT_PER_THREAD];
};
static void *live_briefly(void *arg) {
    struct short_lived *s = arg;
    LPVOID roots[ROOTS_PER_THREAD];
    for (int i = 0; i < ROOTS_PER_THREAD; i++) {
        ULONG n = (ULONG)(16 + (s->id * 31 + (uint32_t)i * 97) % 2000);
        roots[i] = NULL;
        CHECK_SC(MAPIAllocateBuffer(n, &roots[i]), S_OK);
        for (int k = 0; k < i % 3 && roots[i] != NULL; k++) {
            LPVOID l = NULL;
            CHECK_SC(MAPIAllocateMore(n / 2, roots[i], &l), S_OK);
        }
    }
    for (int i = 0; i < ROOTS_PER_THREAD; i++) {
        if (i % 2 == 0)
            CHECK(MAPIFreeBuffer(roots[i]) == 0);
        else
            s->kept[i / 2] = roots[i];
    }
    return NULL;
}
static long rss_kib(void) {
    long pages = 0, resident = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (f == NULL) return -1;
    if (fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = -1;
    fclose(f);
    return resident < 0 ? -1 : resident * (sysconf(_SC_PAGESIZE) / 1024);
}
static long max_long(long a, long b) { return a > b ? a : b; }
static void threads_short_lived(int total) {
    static struct short_lived s[WAVE];
    const int warm = total / 10, half = total / 2;
    /* Peaks of committed bytes and RSS, in KiB, over [warm, half) and [half, total). */
    long committed_peak[2] = {0, 0}, rss_peak[2] = {0, 0};
    struct mapialloc_stats before = snap();
    for (int done = 0; done < total; done += WAVE) {
        pthread_t t[WAVE];
        for (int i = 0; i < WAVE; i++) {
            s[i].id = (uint32_t)(done + i);
            start(&t[i], live_briefly, &s[i]);
        }
        for (int i = 0; i < WAVE; i++) join(t[i]);
        for (int i = 0; i < WAVE; i++) /* the kept roots die on the main thread */
            for (int k = 0; k < KEPT_PER_THREAD; k++) CHECK(MAPIFreeBuffer(s[i].kept[k]) == 0);
        if (done >= warm) {
            int second = done >= half;
            committed_peak[second] =
                max_long(committed_peak[second], (long)(snap().os_committed_bytes / 1024));
            rss_peak[second] = max_long(rss_peak[second], rss_kib());
        }
    }
    check_live_delta(&before, 0, 0, "short-lived threads");
    printf("short-lived threads: %d; peak committed %ld -> %ld KiB, peak RSS %ld -> %ld KiB "
           "(first half after warm-up -> second half)\n",
           total, committed_peak[0], committed_peak[1], rss_peak[0], rss_peak[1]);
    CHECK(committed_peak[1] <= committed_peak[0] + GROWTH_MARGIN_KIB);
    if (!under_valgrind) CHECK(rss_peak[1] <= rss_peak[0] + GROWTH_MARGIN_KIB);
}

/* ---- main -------------------------------------------------------------------------- */

#define RUN(test)                                                                          \
    do {                                                                                   \
        int failed_before_ = atomic_load(&failures);                                       \
        test;                                                                              \
        printf("%s %s\n", atomic_load(&failures) == failed_before_ ? "ok  " : "FAIL", #test); \
        fflush(stdout);                                                                    \
    } while (0)

int main(int argc, char **argv) {
    int threads = 2000;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc)
            threads = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: %s [--threads N]\n", argv[0]);
            return 2;
        }
    }
    const char *vg = getenv("MAPIALLOC_TEST_UNDER_VALGRIND");
    under_valgrind = vg != NULL && strcmp(vg, "1") == 0;

    RUN(row_more_than_the_process_can_get()); /* forks: first, while single-threaded */
    RUN(row_allocate_buffer());
    RUN(row_zero_size());
    RUN(row_huge_sizes());
    RUN(row_null_out_pointer());
    RUN(row_allocate_more());
    RUN(row_null_parent());
    RUN(row_linked_parent());
    RUN(row_freed_parent());
    RUN(row_free_null());
    RUN(row_free_linked());
    RUN(row_double_free());
    RUN(row_foreign_parent());
    RUN(row_free_foreign());
    RUN(row_triple());
    RUN(threads_link_to_one_root());
    RUN(threads_free_roots_of_others());
    RUN(threads_race_to_free());
    RUN(threads_free_races_link());
    RUN(threads_short_lived(threads));

    mapialloc_collect();
    struct mapialloc_stats end = snap();
    printf("end: live_roots=%llu live_blocks=%llu os_committed_bytes=%llu double_frees=%llu "
           "linked_frees=%llu foreign_frees=%llu bad_parents=%llu remote_frees=%llu\n",
           (unsigned long long)end.live_roots, (unsigned long long)end.live_blocks,
           (unsigned long long)end.os_committed_bytes, (unsigned long long)end.double_frees,
           (unsigned long long)end.linked_frees, (unsigned long long)end.foreign_frees,
           (unsigned long long)end.bad_parents, (unsigned long long)end.remote_frees);
    CHECK(end.live_roots == 0 && end.live_blocks == 0);
    printf("mapi_test: %ld checks, %d failed\n", atomic_load(&checks), atomic_load(&failures));
    return atomic_load(&failures) == 0 ? 0 : 1;
}
