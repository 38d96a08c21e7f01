/* Process-wide registry of guest memory mappings: reference-counted, found by id from any thread,
 * and watched by the SIGBUS handler (see mappings.c). No N-API in here. */
#ifndef VUBD_MAPPINGS_H
#define VUBD_MAPPINGS_H

#include <stdbool.h>
#include <stddef.h>

typedef struct vubd_mapping vubd_mapping;

/* Installs the SIGBUS handler (once per process). */
void vubd_mappings_init(void);

/* Maps [off, off+len) of fd shared. The mapping starts with one reference: the owner's
 * (`owner` true: dropped by vubd_mapping_release_owner) or a view's (dropped by vubd_mapping_put).
 * Owner references are for whoever hands ids out; only views give access to the pages.
 * Returns NULL with errno set. */
vubd_mapping *vubd_mapping_create(int fd, size_t len, long long off, bool writable, bool owner, double *id);

/* The mapping named by id with one more reference for a new view; NULL if id names none. */
vubd_mapping *vubd_mapping_get(double id);

/* One more owner reference (a new memory table that keeps this chunk); false if there is no owner left. */
bool vubd_mapping_retain_owner(double id);

/* Drops an owner reference; false if id names no mapping or no owner reference is left. */
bool vubd_mapping_release_owner(double id);

/* Drops a reference; the last one unmaps. */
void vubd_mapping_put(vubd_mapping *m);

void *vubd_mapping_addr(const vubd_mapping *m);
size_t vubd_mapping_len(const vubd_mapping *m);

/* Mappings currently alive (each counted once, however many views it has). */
size_t vubd_mappings_live(void);

/* SIGBUS faults inside a mapping that were patched with a zero page. */
unsigned long vubd_sigbus_rescues(void);

#endif
