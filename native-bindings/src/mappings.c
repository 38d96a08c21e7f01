/* Guest memory mappings, made once per process and shared by every thread through views.
 *
 * Each mapping has a slot in a table that the SIGBUS handler reads without a lock: a frontend can
 * truncate the file behind a mapping, and touching a page past the new end raises SIGBUS, which
 * would kill the daemon. A SIGBUS inside a mapping puts an anonymous zero page over the faulting
 * page and counts it (the workers see the count and mark their queues broken); a SIGBUS anywhere
 * else keeps its old effect. The table grows in slabs published with an atomic pointer and never
 * freed, so the handler only ever reads memory that stays valid, and no fixed limit applies.
 *
 * Everything except the handler takes `lock`: mapping, viewing and releasing happen on memory
 * table changes, not per request. */
#include "mappings.h"

#include <errno.h>
#include <linux/magic.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/vfs.h>
#include <unistd.h>

#define SLAB_SLOTS 1024
#define MAX_SLABS 1024 /* 2^20 slots: far past vm.max_map_count */
#define ID_SLOT_SPAN 1048576.0 /* id = slot + serial * 2^20, exact in a double */
#define ID_LIMIT 4503599627370496.0 /* 2^52: serials are 32 bits */

struct vubd_mapping {
  void *p;
  size_t len;
  uint32_t slot;
  int refs;   /* under lock: owners plus views */
  int owners; /* under lock: references taken by create (owner) and retain */
};

typedef struct {
  /* read lock-free by the handler: a slot is live while its len is non-zero */
  _Atomic uintptr_t base;
  _Atomic size_t len;
  /* page size of the mapping (huge pages for hugetlbfs): the unit a zero page must replace */
  _Atomic size_t granule;
  /* under lock */
  vubd_mapping *m;
  uint32_t serial; /* bumped when the slot is freed: a stale id names nothing */
} slot_t;

static _Atomic(slot_t *) slabs[MAX_SLABS];
/* slots [0, slots_used) have their slab allocated */
static atomic_uint slots_used;
/* under lock: no slot below this one is free (mapping a big table one chunk after another stays linear) */
static uint32_t first_free;
static size_t live;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static atomic_ulong sigbus_rescued;
static struct sigaction prev_sigbus;
static size_t page_size = 4096;
static pthread_once_t init_once = PTHREAD_ONCE_INIT;

static slot_t *slot_at(uint32_t i) {
  return &atomic_load(&slabs[i / SLAB_SLOTS])[i % SLAB_SLOTS];
}

/* Under lock: a free slot, growing the table by a slab when all are taken; NULL when full. */
static slot_t *free_slot(uint32_t *index) {
  uint32_t used = atomic_load(&slots_used);
  for (uint32_t i = first_free; i < used; i++) {
    slot_t *s = slot_at(i);
    if (s->m == NULL) return first_free = i + 1, *index = i, s;
  }
  if (used == (uint32_t)SLAB_SLOTS * MAX_SLABS) return NULL;
  if (used % SLAB_SLOTS == 0) {
    slot_t *slab = calloc(SLAB_SLOTS, sizeof *slab);
    if (slab == NULL) return NULL;
    atomic_store(&slabs[used / SLAB_SLOTS], slab);
  }
  atomic_store(&slots_used, used + 1); /* after the slab pointer: the handler never sees a NULL slab */
  first_free = used + 1;
  return *index = used, slot_at(used);
}

static double id_of(uint32_t index, const slot_t *s) {
  return (double)index + (double)s->serial * ID_SLOT_SPAN;
}

/* Under lock: the live mapping named by id, or NULL. */
static vubd_mapping *find(double id) {
  if (!(id >= 0 && id < ID_LIMIT)) return NULL;
  double serial = (double)(uint64_t)(id / ID_SLOT_SPAN);
  double index = id - serial * ID_SLOT_SPAN;
  if (index != (double)(uint32_t)index || index >= (double)atomic_load(&slots_used)) return NULL;
  slot_t *s = slot_at((uint32_t)index);
  return s->m != NULL && (double)s->serial == serial ? s->m : NULL;
}

vubd_mapping *vubd_mapping_create(int fd, size_t len, long long off, bool writable, bool owner, double *id) {
  struct statfs sfs;
  size_t granule = page_size;
  if (fstatfs(fd, &sfs) == 0 && sfs.f_type == HUGETLBFS_MAGIC && sfs.f_bsize > 0) granule = (size_t)sfs.f_bsize;
  vubd_mapping *m = calloc(1, sizeof *m);
  if (m == NULL) return errno = ENOMEM, NULL;
  void *p = mmap(NULL, len, PROT_READ | (writable ? PROT_WRITE : 0), MAP_SHARED, fd, (off_t)off);
  if (p == MAP_FAILED) {
    int err = errno;
    free(m);
    return errno = err, NULL;
  }
  m->p = p;
  m->len = len;
  m->refs = 1;
  m->owners = owner ? 1 : 0;
  pthread_mutex_lock(&lock);
  uint32_t index;
  slot_t *s = free_slot(&index);
  if (s != NULL) {
    m->slot = index;
    s->m = m;
    atomic_store(&s->granule, granule);
    atomic_store(&s->base, (uintptr_t)p);
    atomic_store(&s->len, len);
    *id = id_of(index, s);
    live++;
  }
  pthread_mutex_unlock(&lock);
  if (s == NULL) {
    munmap(p, len);
    free(m);
    return errno = ENOMEM, NULL;
  }
  return m;
}

vubd_mapping *vubd_mapping_get(double id) {
  pthread_mutex_lock(&lock);
  vubd_mapping *m = find(id);
  if (m != NULL) m->refs++;
  pthread_mutex_unlock(&lock);
  return m;
}

/* Under lock: drops one reference; returns the mapping to unmap if it was the last. */
static vubd_mapping *unref(vubd_mapping *m) {
  if (--m->refs > 0) return NULL;
  slot_t *s = slot_at(m->slot);
  atomic_store(&s->len, 0); /* the handler stops matching it before the range can be reused */
  atomic_store(&s->base, 0);
  s->m = NULL;
  s->serial++;
  if (m->slot < first_free) first_free = m->slot;
  live--;
  return m;
}

static void destroy(vubd_mapping *m) {
  if (m == NULL) return;
  munmap(m->p, m->len);
  free(m);
}

void vubd_mapping_put(vubd_mapping *m) {
  pthread_mutex_lock(&lock);
  vubd_mapping *dead = unref(m);
  pthread_mutex_unlock(&lock);
  destroy(dead);
}

bool vubd_mapping_retain_owner(double id) {
  pthread_mutex_lock(&lock);
  vubd_mapping *m = find(id);
  bool ok = m != NULL && m->owners > 0;
  if (ok) {
    m->owners++;
    m->refs++;
  }
  pthread_mutex_unlock(&lock);
  return ok;
}

bool vubd_mapping_release_owner(double id) {
  vubd_mapping *dead = NULL;
  pthread_mutex_lock(&lock);
  vubd_mapping *m = find(id);
  bool ok = m != NULL && m->owners > 0;
  if (ok) {
    m->owners--;
    dead = unref(m);
  }
  pthread_mutex_unlock(&lock);
  destroy(dead);
  return ok;
}

void *vubd_mapping_addr(const vubd_mapping *m) {
  return m->p;
}

size_t vubd_mapping_len(const vubd_mapping *m) {
  return m->len;
}

size_t vubd_mappings_live(void) {
  pthread_mutex_lock(&lock);
  size_t n = live;
  pthread_mutex_unlock(&lock);
  return n;
}

unsigned long vubd_sigbus_rescues(void) {
  return atomic_load(&sigbus_rescued);
}

static void on_sigbus(int sig, siginfo_t *si, void *uc) {
  int saved_errno = errno;
  /* Only a real access past the end of a mapped file (BUS_ADRERR) is cured by a zero page. */
  if (si->si_code == BUS_ADRERR) {
    uintptr_t a = (uintptr_t)si->si_addr;
    uint32_t used = atomic_load(&slots_used);
    for (uint32_t i = 0; i < used; i++) {
      slot_t *s = slot_at(i);
      size_t len = atomic_load(&s->len);
      uintptr_t base = atomic_load(&s->base);
      if (len == 0 || a < base || a - base >= len) continue;
      size_t g = atomic_load(&s->granule);
      void *page = (void *)(a & ~(uintptr_t)(g - 1));
      if (mmap(page, g, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != MAP_FAILED) {
        atomic_fetch_add(&sigbus_rescued, 1);
        errno = saved_errno;
        return;
      }
      break;
    }
  }
  /* Not ours: whatever was there before; by default the process dies of SIGBUS as it would have. */
  errno = saved_errno;
  if ((prev_sigbus.sa_flags & SA_SIGINFO) && prev_sigbus.sa_sigaction != NULL) {
    prev_sigbus.sa_sigaction(sig, si, uc);
  } else if (prev_sigbus.sa_handler != SIG_DFL && prev_sigbus.sa_handler != SIG_IGN) {
    prev_sigbus.sa_handler(sig);
  } else {
    signal(SIGBUS, SIG_DFL);
    raise(SIGBUS); /* pending until we return (SIGBUS is blocked in here): a sent signal is not lost */
  }
}

static void install_sigbus(void) {
  long ps = sysconf(_SC_PAGESIZE);
  if (ps > 0) page_size = (size_t)ps;
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_sigbus;
  sa.sa_flags = SA_SIGINFO;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGBUS, &sa, &prev_sigbus);
}

void vubd_mappings_init(void) {
  pthread_once(&init_once, install_sigbus);
}
