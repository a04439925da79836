/*
 * provider.c: a MAPI-provider-shaped program on mapialloc.
 *
 * A "provider" thread answers GetProps-like calls: it gets the allocation triple the way a
 * provider gets it from IMAPISupport::GetMemAllocRoutines, builds an SPropValue array with
 * one MAPIAllocateBuffer, and hangs the strings and binaries off it with MAPIAllocateMore.
 * It hands each array to a "client" thread, which reads it and frees it, strings and all,
 * with a single MAPIFreeBuffer (the direct export: triple and exports are interchangeable).
 *
 * Build: make (see the Makefile), run: ./provider
 */
#include <mapialloc.h>

#include <pthread.h>
#include <stdio.h>
#include <string.h>

/* A cut-down SPropValue, shaped like MAPI's (mapidefs.h). */
#define PT_LONG 0x0003u
#define PT_STRING8 0x001Eu
#define PT_BINARY 0x0102u
#define PROP_TAG(type, id) (((ULONG)(id) << 16) | (ULONG)(type))
#define PROP_TYPE(tag) ((tag) & 0xFFFFu)

typedef struct {
    ULONG cb;
    unsigned char *lpb;
} SBinary;

typedef struct {
    ULONG ulPropTag;
    ULONG dwAlignPad;
    union {
        int32_t l;
        char *lpszA;
        SBinary bin;
    } Value;
} SPropValue;

enum { ROWS = 1000, PROPS = 4 };

/* The provider's view of memory: only the triple, as MAPI hands it out. */
struct provider {
    LPALLOCATEBUFFER allocate_buffer;
    LPALLOCATEMORE allocate_more;
    LPFREEBUFFER free_buffer;
};

/* Copies a string into a block linked to the array `root`. */
static SCODE dup_string(const struct provider *p, LPVOID root, const char *s, char **out) {
    LPVOID block = NULL;
    SCODE sc = p->allocate_more((ULONG)strlen(s) + 1, root, &block);
    if (sc != S_OK) return sc;
    memcpy(block, s, strlen(s) + 1);
    *out = block;
    return S_OK;
}

/* GetProps: one root array, its strings and binaries linked to it. The caller frees the
 * whole answer with one MAPIFreeBuffer. */
static SCODE get_props(const struct provider *p, int row, SPropValue **answer) {
    LPVOID root = NULL;
    SCODE sc = p->allocate_buffer(PROPS * sizeof(SPropValue), &root);
    if (sc != S_OK) return sc;
    SPropValue *props = root;
    char subject[64], sender[64];
    snprintf(subject, sizeof subject, "Message %d", row);
    snprintf(sender, sizeof sender, "user%d@example.org", row % 17);

    props[0].ulPropTag = PROP_TAG(PT_LONG, 0x0E08); /* PR_MESSAGE_SIZE */
    props[0].Value.l = 1000 + row;
    props[1].ulPropTag = PROP_TAG(PT_STRING8, 0x0037); /* PR_SUBJECT */
    props[2].ulPropTag = PROP_TAG(PT_STRING8, 0x0C1F); /* PR_SENDER_EMAIL_ADDRESS */
    props[3].ulPropTag = PROP_TAG(PT_BINARY, 0x0FFF);  /* PR_ENTRYID */
    props[3].Value.bin.cb = 24;
    LPVOID entry_id = NULL;
    if ((sc = dup_string(p, root, subject, &props[1].Value.lpszA)) != S_OK ||
        (sc = dup_string(p, root, sender, &props[2].Value.lpszA)) != S_OK ||
        (sc = p->allocate_more(props[3].Value.bin.cb, root, &entry_id)) != S_OK) {
        p->free_buffer(root); /* frees whatever was linked so far */
        return sc;
    }
    props[3].Value.bin.lpb = entry_id;
    for (ULONG i = 0; i < props[3].Value.bin.cb; i++)
        props[3].Value.bin.lpb[i] = (unsigned char)(row + i);
    *answer = props;
    return S_OK;
}

/* A one-slot mailbox from the provider thread to the client thread. */
static struct {
    pthread_mutex_t lock;
    pthread_cond_t changed;
    SPropValue *row;
    int closed;
} mailbox = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, 0};

static void *provider_thread(void *arg) {
    struct provider p;
    (void)arg;
    if (mapialloc_mem_alloc_routines(&p.allocate_buffer, &p.allocate_more, &p.free_buffer) != S_OK)
        return (void *)"no allocation routines";
    for (int row = 0; row < ROWS; row++) {
        SPropValue *props = NULL;
        if (get_props(&p, row, &props) != S_OK) return (void *)"GetProps failed";
        pthread_mutex_lock(&mailbox.lock);
        while (mailbox.row != NULL) pthread_cond_wait(&mailbox.changed, &mailbox.lock);
        mailbox.row = props;
        pthread_cond_broadcast(&mailbox.changed);
        pthread_mutex_unlock(&mailbox.lock);
    }
    pthread_mutex_lock(&mailbox.lock);
    mailbox.closed = 1;
    pthread_cond_broadcast(&mailbox.changed);
    pthread_mutex_unlock(&mailbox.lock);
    return NULL;
}

static void *client_thread(void *arg) {
    unsigned long *bytes_seen = arg;
    for (;;) {
        pthread_mutex_lock(&mailbox.lock);
        while (mailbox.row == NULL && !mailbox.closed)
            pthread_cond_wait(&mailbox.changed, &mailbox.lock);
        SPropValue *props = mailbox.row;
        mailbox.row = NULL;
        pthread_cond_broadcast(&mailbox.changed);
        pthread_mutex_unlock(&mailbox.lock);
        if (props == NULL) return NULL; /* closed and drained */
        for (int i = 0; i < PROPS; i++) {
            if (PROP_TYPE(props[i].ulPropTag) == PT_STRING8)
                *bytes_seen += strlen(props[i].Value.lpszA);
            else if (PROP_TYPE(props[i].ulPropTag) == PT_BINARY)
                *bytes_seen += props[i].Value.bin.cb;
        }
        MAPIFreeBuffer(props); /* the array, its strings and its binary, in one call */
    }
}

int main(void) {
    pthread_t provider, client;
    unsigned long bytes_seen = 0;
    void *provider_error = NULL;
    pthread_create(&client, NULL, client_thread, &bytes_seen);
    pthread_create(&provider, NULL, provider_thread, NULL);
    pthread_join(provider, &provider_error);
    if (provider_error != NULL) { /* let the client finish, then report */
        pthread_mutex_lock(&mailbox.lock);
        mailbox.closed = 1;
        pthread_cond_broadcast(&mailbox.changed);
        pthread_mutex_unlock(&mailbox.lock);
    }
    pthread_join(client, NULL);

    struct mapialloc_stats stats;
    mapialloc_stats(&stats);
    printf("rows: %d, string and binary bytes read: %lu\n", ROWS, bytes_seen);
    printf("live roots: %llu, live blocks: %llu, remote frees: %llu\n",
           (unsigned long long)stats.live_roots, (unsigned long long)stats.live_blocks,
           (unsigned long long)stats.remote_frees);
    if (provider_error != NULL) {
        fprintf(stderr, "provider: %s\n", (const char *)provider_error);
        return 1;
    }
    return stats.live_roots == 0 && stats.live_blocks == 0 ? 0 : 1;
}
