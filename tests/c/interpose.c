/*
 * interpose.c: a program linked against libfake_mapi.so (another library exporting the
 * MAPI memory calls). Run as is, the fake serves the calls; run with
 * LD_PRELOAD=libmapialloc.so, mapialloc must serve them. It prints which one did:
 *     served-by=fake        or        served-by=mapialloc
 * and exits non-zero when the evidence is inconsistent.
 */
#define _GNU_SOURCE
#include "mapialloc.h"

#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

unsigned long fake_mapi_calls(void); /* from libfake_mapi.so */

typedef SCODE (*stats_fn)(struct mapialloc_stats *);

int main(void) {
    /* mapialloc_stats exists in the process only when mapialloc is loaded. */
    stats_fn stats = (stats_fn)(uintptr_t)dlsym(RTLD_DEFAULT, "mapialloc_stats");
    struct mapialloc_stats before, with_root, with_link, after;
    memset(&before, 0, sizeof before);
    if (stats != NULL && stats(&before) != S_OK) return 10;

    LPVOID root = NULL, linked = NULL;
    if (MAPIAllocateBuffer(64, &root) != S_OK || root == NULL) return 11;
    if (stats != NULL && stats(&with_root) != S_OK) return 12;
    if (MAPIAllocateMore(64, root, &linked) != S_OK || linked == NULL) return 13;
    if (stats != NULL && stats(&with_link) != S_OK) return 14;
    memset(root, 1, 64);
    memset(linked, 2, 64);
    MAPIFreeBuffer(root);

    if (stats == NULL) {
        printf("served-by=fake calls=%lu\n", fake_mapi_calls());
        return fake_mapi_calls() == 3 ? 0 : 20;
    }
    if (stats(&after) != S_OK) return 15;
    printf("mapialloc live_roots %llu -> %llu -> %llu, live_blocks %llu -> %llu -> %llu; "
           "fake calls %lu\n",
           (unsigned long long)before.live_roots, (unsigned long long)with_root.live_roots,
           (unsigned long long)after.live_roots, (unsigned long long)before.live_blocks,
           (unsigned long long)with_link.live_blocks, (unsigned long long)after.live_blocks,
           fake_mapi_calls());
    int served = with_root.live_roots == before.live_roots + 1 &&
                 with_link.live_blocks == before.live_blocks + 2 &&
                 after.live_roots == before.live_roots &&
                 after.live_blocks == before.live_blocks && fake_mapi_calls() == 0;
    if (!served) return 21;
    printf("served-by=mapialloc\n");
    return 0;
}
