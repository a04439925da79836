/*
 * leaks.c: a program that leaks on purpose, for MAPIALLOC_LEAKS=1 and MAPIALLOC_TRACE
 * (tests/c_abi.rs). It leaves three roots live at exit (eight blocks: roots and linked
 * blocks), one of them allocated on a thread that has exited, and makes 20 MAPI calls on two
 * threads, a few of them misuse.
 */
#include <mapialloc.h>

#include <pthread.h>
#include <stdio.h>

static void *leak_on_a_thread(void *arg) {
    LPVOID root = NULL, more = NULL;
    (void)arg;
    if (MAPIAllocateBuffer(64, &root) != S_OK) return NULL;
    MAPIAllocateMore(8, root, &more);
    MAPIAllocateMore(8, root, &more);
    return root; /* leaked: 3 blocks */
}

int main(void) {
    LPVOID big = NULL, more = NULL, other = NULL, freed[5];
    pthread_t thread;
    void *from_thread = NULL;
    int i;

    if (MAPIAllocateBuffer(1000, &big) != S_OK) return 1;      /* leaked: 4 blocks */
    for (i = 0; i < 3; i++) MAPIAllocateMore(500, big, &more);
    for (i = 0; i < 5; i++) MAPIAllocateBuffer(16, &freed[i]);
    for (i = 0; i < 5; i++) MAPIFreeBuffer(freed[i]);
    MAPIFreeBuffer(freed[0]);                                   /* a double free */
    MAPIFreeBuffer(NULL);
    if (MAPIAllocateBuffer(200, &other) != S_OK) return 1;     /* leaked: 1 block */
    if (pthread_create(&thread, NULL, leak_on_a_thread, NULL) != 0) return 1;
    pthread_join(thread, &from_thread);
    if (from_thread == NULL) return 1;
    printf("leaked %p %p %p\n", big, other, from_thread);
    return 0;
}
