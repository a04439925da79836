/*
 * fake_mapi.c: a stand-in for another MAPI memory library, built as libfake_mapi.so by
 * tests/c_abi.rs. It exports the same three MAPI symbols over malloc (single-threaded,
 * minimal) and counts the calls it serves, so the interposition test can tell whether
 * LD_PRELOAD=libmapialloc.so took them over.
 */
#include "mapialloc.h"

#include <stdlib.h>

/* A block: the chain link, then (16-aligned) the caller's bytes. */
struct fake_block {
    struct fake_block *next;
    void *pad;
};

static unsigned long calls;

/* How many MAPI calls this library served. */
unsigned long fake_mapi_calls(void) { return calls; }

static LPVOID fake_alloc(ULONG cbSize, struct fake_block *link) {
    struct fake_block *b = malloc(sizeof *b + cbSize);
    if (b == NULL) return NULL;
    b->next = link;
    return b + 1;
}

SCODE MAPIAllocateBuffer(ULONG cbSize, LPVOID *lppBuffer) {
    calls++;
    if (lppBuffer == NULL) return MAPI_E_INVALID_PARAMETER;
    *lppBuffer = fake_alloc(cbSize, NULL);
    return *lppBuffer != NULL ? S_OK : MAPI_E_NOT_ENOUGH_MEMORY;
}

SCODE MAPIAllocateMore(ULONG cbSize, LPVOID lpObject, LPVOID *lppBuffer) {
    calls++;
    if (lppBuffer == NULL) return MAPI_E_INVALID_PARAMETER;
    *lppBuffer = NULL;
    if (lpObject == NULL) return MAPI_E_INVALID_PARAMETER;
    struct fake_block *root = (struct fake_block *)lpObject - 1;
    LPVOID p = fake_alloc(cbSize, root->next);
    if (p == NULL) return MAPI_E_NOT_ENOUGH_MEMORY;
    root->next = (struct fake_block *)p - 1;
    *lppBuffer = p;
    return S_OK;
}

ULONG MAPIFreeBuffer(LPVOID lpBuffer) {
    calls++;
    if (lpBuffer == NULL) return 0;
    struct fake_block *b = (struct fake_block *)lpBuffer - 1;
    while (b != NULL) {
        struct fake_block *next = b->next;
        free(b);
        b = next;
    }
    return 0;
}
