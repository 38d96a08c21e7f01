/* Shared mappings of guest memory as external ArrayBuffers (unmapped by the GC finalizer).
 *
 * A frontend can truncate the file behind a mapping; touching a page past the new end raises
 * SIGBUS, which would kill the daemon. Every mapping is registered, and a SIGBUS inside one puts
 * an anonymous zero page over the faulting page and counts it (sigbusRescues()): the access then
 * completes, and the worker marks its queue broken. A SIGBUS anywhere else keeps its old effect. */
#include "util.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <linux/magic.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/vfs.h>
#include <unistd.h>

#define MAX_MAP_LEN (4ULL << 30) /* Node 20 caps external ArrayBuffers at 4 GiB */
#define MAX_TRACKED 4096

/* One per mapping; owned by the ArrayBuffer's finalizer. `done` says the range is unmapped already
 * (by unmap() or the finalizer, whichever runs first). */
typedef struct {
  void *p;
  size_t len;
  atomic_int done;
} mapping_rec;

/* Read lock-free by the signal handler: a slot is live while its len is non-zero. */
static _Atomic uintptr_t tracked_base[MAX_TRACKED];
static _Atomic size_t tracked_len[MAX_TRACKED];
/* page size of the mapping (huge pages for hugetlbfs): the unit a zero page must replace */
static _Atomic size_t tracked_granule[MAX_TRACKED];
/* under tracked_lock only */
static mapping_rec *tracked_rec[MAX_TRACKED];
static pthread_mutex_t tracked_lock = PTHREAD_MUTEX_INITIALIZER;
static atomic_ulong sigbus_rescued;
static struct sigaction prev_sigbus;
static size_t page_size = 4096;
static pthread_once_t sigbus_once = PTHREAD_ONCE_INIT;

static bool track(void *p, size_t len, size_t granule, mapping_rec *rec) {
  bool ok = false;
  pthread_mutex_lock(&tracked_lock);
  for (int i = 0; i < MAX_TRACKED; i++) {
    if (atomic_load(&tracked_len[i]) == 0) {
      atomic_store(&tracked_granule[i], granule);
      tracked_rec[i] = rec;
      atomic_store(&tracked_base[i], (uintptr_t)p);
      atomic_store(&tracked_len[i], len);
      ok = true;
      break;
    }
  }
  pthread_mutex_unlock(&tracked_lock);
  return ok;
}

/* Drops the slot of the mapping at p; returns its record (NULL if p is not tracked). */
static mapping_rec *untrack(void *p) {
  mapping_rec *rec = NULL;
  pthread_mutex_lock(&tracked_lock);
  for (int i = 0; i < MAX_TRACKED; i++) {
    if (atomic_load(&tracked_len[i]) != 0 && atomic_load(&tracked_base[i]) == (uintptr_t)p) {
      atomic_store(&tracked_len[i], 0);
      atomic_store(&tracked_base[i], 0);
      rec = tracked_rec[i];
      tracked_rec[i] = NULL;
      break;
    }
  }
  pthread_mutex_unlock(&tracked_lock);
  return rec;
}

static void on_sigbus(int sig, siginfo_t *si, void *uc) {
  int saved_errno = errno;
  /* Only a real access past the end of a mapped file (BUS_ADRERR) is cured by a zero page. */
  if (si->si_code == BUS_ADRERR) {
    uintptr_t a = (uintptr_t)si->si_addr;
    for (int i = 0; i < MAX_TRACKED; i++) {
      size_t len = atomic_load(&tracked_len[i]);
      uintptr_t base = atomic_load(&tracked_base[i]);
      if (len == 0 || a < base || a - base >= len) continue;
      size_t g = atomic_load(&tracked_granule[i]);
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

static void unmap_finalizer(napi_env env, void *data, void *hint) {
  mapping_rec *rec = hint;
  if (atomic_exchange(&rec->done, 1) == 0) {
    untrack(rec->p);
    munmap(rec->p, rec->len);
  }
  free(rec);
}

/* Unmaps a buffer from mmap() now and detaches it (views see length 0). Workers never return to
 * their event loop, so they cannot wait for the GC finalizer. Returns false if it was not ours. */
static napi_value do_unmap(napi_env env, napi_callback_info info) {
  VUBD_ARGS(1);
  void *data = NULL;
  size_t len = 0;
  bool is = false;
  if (napi_is_arraybuffer(env, argv[0], &is) != napi_ok || !is) return vubd_type_error(env, "buf", "an ArrayBuffer"), NULL;
  napi_get_arraybuffer_info(env, argv[0], &data, &len);
  mapping_rec *rec = data != NULL ? untrack(data) : NULL;
  napi_value result;
  /* The record stays alive until the finalizer frees it; `done` keeps that one from unmapping again. */
  if (rec == NULL || atomic_exchange(&rec->done, 1) != 0) {
    napi_get_boolean(env, false, &result);
    return result;
  }
  napi_detach_arraybuffer(env, argv[0]); /* no JS access after this (views see length 0) */
  munmap(data, len);
  napi_get_boolean(env, true, &result);
  return result;
}

static napi_value sigbus_rescues(napi_env env, napi_callback_info info) {
  return vubd_num(env, (double)atomic_load(&sigbus_rescued));
}

static napi_value do_mmap(napi_env env, napi_callback_info info) {
  VUBD_ARGS(4);
  int32_t fd;
  double len_d, off_d;
  bool writable;
  if (!vubd_arg_i32(env, argv[0], "fd", &fd)) return NULL;
  if (napi_get_value_double(env, argv[1], &len_d) != napi_ok) return vubd_type_error(env, "length", "a number"), NULL;
  if (!(len_d > 0 && len_d <= (double)MAX_MAP_LEN) || (double)(uint64_t)len_d != len_d)
    return vubd_throw_errno_msg(env, ERANGE,
                                "mmap: length must be an integer in (0, 4 GiB]; map regions over 4 GiB in chunks");
  size_t len = (size_t)len_d;
  if (napi_get_value_double(env, argv[2], &off_d) != napi_ok) return vubd_type_error(env, "offset", "a number"), NULL;
  vubd_arg_bool(env, argv[3], &writable);
  /* Negative, fractional or unaligned offsets: EINVAL, as the kernel would report. */
  if (!(off_d >= 0 && off_d <= VUBD_MAX_SAFE) || (double)(int64_t)off_d != off_d)
    return vubd_throw_errno(env, "mmap", EINVAL);
  struct statfs sfs;
  size_t granule = page_size;
  if (fstatfs(fd, &sfs) == 0 && sfs.f_type == HUGETLBFS_MAGIC && sfs.f_bsize > 0) granule = (size_t)sfs.f_bsize;
  mapping_rec *rec = calloc(1, sizeof *rec);
  if (rec == NULL) return vubd_throw_errno(env, "mmap", ENOMEM);
  void *p = mmap(NULL, len, PROT_READ | (writable ? PROT_WRITE : 0), MAP_SHARED, fd, (off_t)off_d);
  if (p == MAP_FAILED) {
    int err = errno;
    free(rec);
    return vubd_throw_errno(env, "mmap", err);
  }
  rec->p = p;
  rec->len = len;
  if (!track(p, len, granule, rec)) {
    munmap(p, len);
    free(rec);
    return vubd_throw_errno_msg(env, ENOMEM, "mmap: too many guest memory mappings (4096)");
  }
  napi_value ab;
  /* On failure Node has already run the finalizer (untrack, munmap, free) or never took ownership
   * with an exception pending; either way touch neither p nor rec (the range could be reused). */
  if (napi_create_external_arraybuffer(env, p, len, unmap_finalizer, rec, &ab) != napi_ok) return NULL;
  return ab;
}

/* Host address of an ArrayBuffer's first byte (or of a TypedArray/DataView's first viewed byte). */
static napi_value address_of(napi_env env, napi_callback_info info) {
  VUBD_ARGS(1);
  bool is;
  void *data = NULL;
  if (napi_is_arraybuffer(env, argv[0], &is) == napi_ok && is) {
    napi_get_arraybuffer_info(env, argv[0], &data, NULL);
  } else if (napi_is_typedarray(env, argv[0], &is) == napi_ok && is) {
    napi_get_typedarray_info(env, argv[0], NULL, NULL, &data, NULL, NULL);
  } else if (napi_is_dataview(env, argv[0], &is) == napi_ok && is) {
    napi_get_dataview_info(env, argv[0], NULL, &data, NULL, NULL);
  } else {
    return vubd_type_error(env, "buf", "an ArrayBuffer"), NULL;
  }
  return vubd_num(env, (double)(uintptr_t)data);
}

napi_status vubd_init_memory(napi_env env, napi_value exports) {
  pthread_once(&sigbus_once, install_sigbus);
  napi_property_descriptor props[] = {VUBD_FN("mmap", do_mmap), VUBD_FN("addressOf", address_of),
                                      VUBD_FN("sigbusRescues", sigbus_rescues), VUBD_FN("unmap", do_unmap)};
  return napi_define_properties(env, exports, 4, props);
}
