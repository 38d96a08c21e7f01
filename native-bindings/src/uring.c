/*
 * io_uring over raw syscalls (no liburing). One SQE per prep call, user_data = tag.
 * The SQ index array is the identity map, so SQE slot = tail & mask. Pending (prepared but not
 * yet consumed) SQEs are tail - head, which submit() hands to io_uring_enter.
 */
#include "util.h"

#include <linux/io_uring.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#define MAX_SEGS 1024

/* The read or write a tag last prepared, as far as it has been transferred (iovs are advanced in place). */
struct rw_state {
  uint8_t op; /* IORING_OP_READV / WRITEV, or 0 */
  int32_t fd;
  uint32_t cnt, first; /* iovecs, and the first not yet fully transferred */
  uint64_t off, done;  /* file offset and bytes transferred as of `first` */
};

typedef struct {
  int fd; /* -1 once closed */
  unsigned sq_entries;
  void *sq_map, *cq_map;
  size_t sq_map_len, cq_map_len;
  struct io_uring_sqe *sqes;
  size_t sqes_len;
  unsigned *sq_head, *sq_tail, *sq_flags, sq_mask;
  unsigned *cq_head, *cq_tail, cq_mask;
  struct io_uring_cqe *cqes;
  unsigned tail; /* our copy of *sq_tail */
  uint32_t max_tags, max_segs;
  uint8_t sqe_flags;  /* IOSQE_ASYNC for a ring that must never block its submitter */
  struct iovec *iovs; /* max_tags * max_segs */
  struct rw_state *rw; /* max_tags: what prepRest needs to continue a short read or write */
} ring_t;

static int sys_setup(unsigned entries, struct io_uring_params *p) {
  return (int)syscall(__NR_io_uring_setup, entries, p);
}

static int sys_enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags) {
  return (int)syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, NULL, 0);
}

static void ring_release(ring_t *r) {
  if (r->fd < 0) return;
  if (r->sqes) munmap(r->sqes, r->sqes_len);
  if (r->cq_map && r->cq_map != r->sq_map) munmap(r->cq_map, r->cq_map_len);
  if (r->sq_map) munmap(r->sq_map, r->sq_map_len);
  close(r->fd);
  free(r->iovs);
  free(r->rw);
  r->sqes = NULL;
  r->sq_map = r->cq_map = NULL;
  r->iovs = NULL;
  r->rw = NULL;
  r->fd = -1;
}

static void ring_finalize(napi_env env, void *data, void *hint) {
  ring_release(data);
  free(data);
}

static int ring_map(ring_t *r, struct io_uring_params *p) {
  r->sq_map_len = p->sq_off.array + p->sq_entries * sizeof(unsigned);
  r->cq_map_len = p->cq_off.cqes + p->cq_entries * sizeof(struct io_uring_cqe);
  bool single = p->features & IORING_FEAT_SINGLE_MMAP;
  if (single) {
    if (r->cq_map_len > r->sq_map_len) r->sq_map_len = r->cq_map_len;
    r->cq_map_len = r->sq_map_len;
  }
  r->sq_map = mmap(NULL, r->sq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_SQ_RING);
  if (r->sq_map == MAP_FAILED) return r->sq_map = NULL, errno;
  if (single) {
    r->cq_map = r->sq_map;
  } else {
    r->cq_map = mmap(NULL, r->cq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_CQ_RING);
    if (r->cq_map == MAP_FAILED) return r->cq_map = NULL, errno;
  }
  r->sqes_len = p->sq_entries * sizeof(struct io_uring_sqe);
  r->sqes = mmap(NULL, r->sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_SQES);
  if (r->sqes == MAP_FAILED) return r->sqes = NULL, errno;

  char *sq = r->sq_map, *cq = r->cq_map;
  r->sq_head = (unsigned *)(sq + p->sq_off.head);
  r->sq_tail = (unsigned *)(sq + p->sq_off.tail);
  r->sq_flags = (unsigned *)(sq + p->sq_off.flags);
  r->sq_mask = *(unsigned *)(sq + p->sq_off.ring_mask);
  unsigned *array = (unsigned *)(sq + p->sq_off.array);
  for (unsigned i = 0; i < p->sq_entries; i++) array[i] = i;
  r->cq_head = (unsigned *)(cq + p->cq_off.head);
  r->cq_tail = (unsigned *)(cq + p->cq_off.tail);
  r->cq_mask = *(unsigned *)(cq + p->cq_off.ring_mask);
  r->cqes = (struct io_uring_cqe *)(cq + p->cq_off.cqes);
  r->tail = *r->sq_tail;
  r->sq_entries = p->sq_entries;
  return 0;
}

/*
 * new Ring(entries, maxTags, maxSegs, alwaysAsync = false). alwaysAsync sets IOSQE_ASYNC on every
 * SQE: the kernel never runs an operation inline in io_uring_enter (a FUSE read would block there).
 */
static napi_value ring_ctor(napi_env env, napi_callback_info info) {
  VUBD_ARGS(4);
  uint32_t entries, max_tags, max_segs;
  bool always_async = false;
  if (!vubd_arg_u32(env, argv[0], "entries", &entries) || !vubd_arg_u32(env, argv[1], "maxTags", &max_tags) ||
      !vubd_arg_u32(env, argv[2], "maxSegs", &max_segs))
    return NULL;
  if (argc >= 4 && !vubd_arg_bool(env, argv[3], &always_async)) return NULL;
  if (max_tags == 0 || max_tags > (1u << 20)) return vubd_range_error(env, "maxTags", "must be in [1, 2^20]"), NULL;
  if (max_segs == 0 || max_segs > MAX_SEGS) return vubd_range_error(env, "maxSegs", "must be in [1, 1024]"), NULL;

  ring_t *r = calloc(1, sizeof *r);
  if (r == NULL) return vubd_throw_errno(env, "Ring", ENOMEM);
  r->max_tags = max_tags;
  r->max_segs = max_segs;
  r->sqe_flags = always_async ? IOSQE_ASYNC : 0;
  r->iovs = calloc((size_t)max_tags * max_segs, sizeof(struct iovec));
  r->rw = calloc(max_tags, sizeof(struct rw_state));
  if (r->iovs == NULL || r->rw == NULL) {
    free(r->iovs);
    free(r->rw);
    free(r);
    return vubd_throw_errno(env, "Ring", ENOMEM);
  }
  struct io_uring_params p;
  memset(&p, 0, sizeof p);
  r->fd = sys_setup(entries, &p);
  if (r->fd < 0) {
    int err = errno;
    free(r->iovs);
    free(r->rw);
    free(r);
    return vubd_throw_errno(env, "io_uring_setup", err);
  }
  int err = ring_map(r, &p);
  if (err) {
    ring_release(r);
    free(r);
    return vubd_throw_errno(env, "mmap(io_uring)", err);
  }
  if (napi_wrap(env, self, r, ring_finalize, NULL, NULL) != napi_ok) {
    ring_release(r);
    free(r);
    return NULL;
  }
  return self;
}

/* Fetches this Ring (throws EBADF if closed) and up to n arguments. */
static ring_t *get_ring(napi_env env, napi_callback_info info, napi_value *argv, size_t n) {
  size_t argc = n;
  napi_value self;
  void *r = NULL;
  if (napi_get_cb_info(env, info, &argc, argv, &self, NULL) != napi_ok) return NULL;
  if (napi_unwrap(env, self, &r) != napi_ok || r == NULL) {
    napi_throw_type_error(env, "ERR_INVALID_THIS", "not a Ring");
    return NULL;
  }
  if (((ring_t *)r)->fd < 0) {
    vubd_throw_errno_msg(env, EBADF, "Ring is closed");
    return NULL;
  }
  return r;
}

static bool get_tag(napi_env env, ring_t *r, napi_value v, uint32_t *tag) {
  if (!vubd_arg_u32(env, v, "tag", tag)) return false;
  if (*tag >= r->max_tags) return vubd_range_error(env, "tag", "is out of range [0, maxTags)");
  return true;
}

/* Next free SQE (zeroed), or NULL when the SQ is full. Publish with sqe_commit(). */
static struct io_uring_sqe *sqe_get(ring_t *r) {
  unsigned head = __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
  if (r->tail - head >= r->sq_entries) return NULL;
  struct io_uring_sqe *sqe = &r->sqes[r->tail & r->sq_mask];
  memset(sqe, 0, sizeof *sqe);
  return sqe;
}

static void sqe_commit(ring_t *r) {
  r->sqes[r->tail & r->sq_mask].flags |= r->sqe_flags;
  __atomic_store_n(r->sq_tail, ++r->tail, __ATOMIC_RELEASE);
}

static napi_value prep_rw(napi_env env, napi_callback_info info, uint8_t op) {
  napi_value argv[5];
  ring_t *r = get_ring(env, info, argv, 5);
  int32_t fd, cnt;
  void *data;
  size_t n;
  uint64_t off;
  uint32_t tag;
  if (r == NULL || !vubd_arg_i32(env, argv[0], "fd", &fd) ||
      !vubd_arg_typed(env, argv[1], "iov", napi_float64_array, "a Float64Array", &data, &n) ||
      !vubd_arg_i32(env, argv[2], "iovCount", &cnt) || !vubd_arg_u64(env, argv[3], "fileOffset", &off) ||
      !get_tag(env, r, argv[4], &tag))
    return NULL;
  if (cnt < 0 || (uint32_t)cnt > r->max_segs || (size_t)cnt > n / 2)
    return vubd_range_error(env, "iovCount", "exceeds maxSegs or the iov array"), NULL;
  struct io_uring_sqe *sqe = sqe_get(r);
  if (sqe == NULL) return vubd_bool(env, false);
  struct iovec *slot = &r->iovs[(size_t)tag * r->max_segs];
  const double *v = data;
  for (int32_t i = 0; i < cnt; i++) {
    slot[i].iov_base = (void *)(uintptr_t)v[2 * i];
    slot[i].iov_len = (size_t)v[2 * i + 1];
  }
  sqe->opcode = op;
  sqe->fd = fd;
  sqe->addr = (uint64_t)(uintptr_t)slot;
  sqe->len = (uint32_t)cnt;
  sqe->off = off;
  sqe->user_data = tag;
  sqe_commit(r);
  r->rw[tag] = (struct rw_state){.op = op, .fd = fd, .cnt = (uint32_t)cnt, .first = 0, .off = off, .done = 0};
  return vubd_bool(env, true);
}

/*
 * prepRest(tag, done): the tag's last read or write transferred `done` bytes in all (a short
 * transfer, or -EAGAIN / -EINTR with done unchanged); prepares the same operation for the rest.
 * Calling it again with the same done after the SQ was full advances nothing twice.
 */
static napi_value m_prep_rest(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  ring_t *r = get_ring(env, info, argv, 2);
  uint32_t tag;
  uint64_t done;
  if (r == NULL || !get_tag(env, r, argv[0], &tag) || !vubd_arg_u64(env, argv[1], "done", &done)) return NULL;
  struct rw_state *st = &r->rw[tag];
  if (st->op != IORING_OP_READV && st->op != IORING_OP_WRITEV) return vubd_range_error(env, "tag", "has no read or write prepared"), NULL;
  if (done < st->done) return vubd_range_error(env, "done", "is less than already transferred"), NULL;
  struct iovec *slot = &r->iovs[(size_t)tag * r->max_segs];
  uint64_t adv = done - st->done;
  uint32_t first = st->first;
  while (first < st->cnt && (adv > 0 || slot[first].iov_len == 0)) {
    size_t take = adv < slot[first].iov_len ? (size_t)adv : slot[first].iov_len;
    slot[first].iov_base = (char *)slot[first].iov_base + take;
    slot[first].iov_len -= take;
    adv -= take;
    if (slot[first].iov_len == 0) first++;
  }
  if (adv > 0 || first == st->cnt) return vubd_range_error(env, "done", "covers the whole transfer or more"), NULL;
  st->off += done - st->done;
  st->done = done;
  st->first = first;
  struct io_uring_sqe *sqe = sqe_get(r);
  if (sqe == NULL) return vubd_bool(env, false);
  sqe->opcode = st->op;
  sqe->fd = st->fd;
  sqe->addr = (uint64_t)(uintptr_t)&slot[first];
  sqe->len = st->cnt - first;
  sqe->off = st->off;
  sqe->user_data = tag;
  sqe_commit(r);
  return vubd_bool(env, true);
}

static napi_value m_prep_readv(napi_env env, napi_callback_info info) { return prep_rw(env, info, IORING_OP_READV); }
static napi_value m_prep_writev(napi_env env, napi_callback_info info) { return prep_rw(env, info, IORING_OP_WRITEV); }

static napi_value m_prep_fsync(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  ring_t *r = get_ring(env, info, argv, 3);
  int32_t fd;
  uint32_t tag;
  bool datasync = false;
  if (r == NULL || !vubd_arg_i32(env, argv[0], "fd", &fd) || !get_tag(env, r, argv[1], &tag)) return NULL;
  vubd_arg_bool(env, argv[2], &datasync);
  r->rw[tag].op = 0;
  struct io_uring_sqe *sqe = sqe_get(r);
  if (sqe == NULL) return vubd_bool(env, false);
  sqe->opcode = IORING_OP_FSYNC;
  sqe->fd = fd;
  sqe->fsync_flags = datasync ? IORING_FSYNC_DATASYNC : 0;
  sqe->user_data = tag;
  sqe_commit(r);
  return vubd_bool(env, true);
}

static napi_value m_prep_fallocate(napi_env env, napi_callback_info info) {
  napi_value argv[5];
  ring_t *r = get_ring(env, info, argv, 5);
  int32_t fd, mode;
  uint64_t off, len;
  uint32_t tag;
  if (r == NULL || !vubd_arg_i32(env, argv[0], "fd", &fd) || !vubd_arg_i32(env, argv[1], "mode", &mode) ||
      !vubd_arg_u64(env, argv[2], "offset", &off) || !vubd_arg_u64(env, argv[3], "length", &len) ||
      !get_tag(env, r, argv[4], &tag))
    return NULL;
  r->rw[tag].op = 0;
  struct io_uring_sqe *sqe = sqe_get(r);
  if (sqe == NULL) return vubd_bool(env, false);
  sqe->opcode = IORING_OP_FALLOCATE;
  sqe->fd = fd;
  sqe->addr = len;
  sqe->len = (uint32_t)mode;
  sqe->off = off;
  sqe->user_data = tag;
  sqe_commit(r);
  return vubd_bool(env, true);
}

/*
 * Hands all pending SQEs to the kernel; returns how many it consumed (head advance).
 * EINTR is retried; EAGAIN (no memory for requests) and EBUSY (CQ overflow backlog: reap first)
 * return what was consumed so far, possibly 0. Other errors throw.
 */
static napi_value enter(napi_env env, ring_t *r, unsigned min_complete, unsigned flags) {
  unsigned start = __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
  for (;;) {
    unsigned head = __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
    unsigned pending = r->tail - head;
    if (pending == 0 && !(flags & IORING_ENTER_GETEVENTS)) break;
    int ret = sys_enter(r->fd, pending, min_complete, flags);
    if (ret >= 0) break;
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EBUSY) break;
    return vubd_throw_errno(env, "io_uring_enter", errno);
  }
  return vubd_num(env, (double)(__atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE) - start));
}

static napi_value m_submit(napi_env env, napi_callback_info info) {
  ring_t *r = get_ring(env, info, NULL, 0);
  return r ? enter(env, r, 0, 0) : NULL;
}

static napi_value m_submit_and_wait(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  ring_t *r = get_ring(env, info, argv, 1);
  uint32_t min;
  if (r == NULL || !vubd_arg_u32(env, argv[0], "minComplete", &min)) return NULL;
  return enter(env, r, min, IORING_ENTER_GETEVENTS);
}

static napi_value m_reap(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  ring_t *r = get_ring(env, info, argv, 1);
  void *data;
  size_t n;
  if (r == NULL || !vubd_arg_typed(env, argv[0], "out", napi_float64_array, "a Float64Array", &data, &n)) return NULL;
  double *out = data;
  size_t max = n / 2, count = 0;
  unsigned head = *r->cq_head;
  for (;;) {
    unsigned tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
    while (head != tail && count < max) {
      const struct io_uring_cqe *cqe = &r->cqes[head & r->cq_mask];
      out[2 * count] = (double)cqe->user_data;
      out[2 * count + 1] = (double)cqe->res;
      count++;
      head++;
    }
    __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
    /* CQ drained but the kernel holds overflowed CQEs: flush them into the ring and go on. */
    if (count < max && head == tail && (__atomic_load_n(r->sq_flags, __ATOMIC_ACQUIRE) & IORING_SQ_CQ_OVERFLOW)) {
      if (sys_enter(r->fd, 0, 0, IORING_ENTER_GETEVENTS) < 0 && errno != EINTR) break;
      if (__atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE) == tail) break;
      continue;
    }
    break;
  }
  return vubd_num(env, (double)count);
}

static napi_value m_close(napi_env env, napi_callback_info info) {
  napi_value self;
  void *r = NULL;
  size_t argc = 0;
  if (napi_get_cb_info(env, info, &argc, NULL, &self, NULL) != napi_ok) return NULL;
  if (napi_unwrap(env, self, &r) == napi_ok && r != NULL) ring_release(r);
  return NULL;
}

static napi_value g_fd(napi_env env, napi_callback_info info) {
  napi_value self;
  void *r = NULL;
  size_t argc = 0;
  if (napi_get_cb_info(env, info, &argc, NULL, &self, NULL) != napi_ok || napi_unwrap(env, self, &r) != napi_ok)
    return NULL;
  return vubd_int(env, ((ring_t *)r)->fd);
}

static napi_value g_entries(napi_env env, napi_callback_info info) {
  napi_value self;
  void *r = NULL;
  size_t argc = 0;
  if (napi_get_cb_info(env, info, &argc, NULL, &self, NULL) != napi_ok || napi_unwrap(env, self, &r) != napi_ok)
    return NULL;
  return vubd_int(env, (int32_t)((ring_t *)r)->sq_entries);
}

napi_status vubd_init_uring(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      VUBD_METHOD("prepReadv", m_prep_readv),
      VUBD_METHOD("prepWritev", m_prep_writev),
      VUBD_METHOD("prepFsync", m_prep_fsync),
      VUBD_METHOD("prepFallocate", m_prep_fallocate),
      VUBD_METHOD("prepRest", m_prep_rest),
      VUBD_METHOD("submit", m_submit),
      VUBD_METHOD("submitAndWait", m_submit_and_wait),
      VUBD_METHOD("reap", m_reap),
      VUBD_METHOD("close", m_close),
      {"fd", NULL, NULL, g_fd, NULL, NULL, napi_default, NULL},
      {"entries", NULL, NULL, g_entries, NULL, NULL, napi_default, NULL},
  };
  napi_value cls;
  napi_status s = napi_define_class(env, "Ring", NAPI_AUTO_LENGTH, ring_ctor, NULL, sizeof props / sizeof props[0],
                                    props, &cls);
  if (s != napi_ok) return s;
  return napi_set_named_property(env, exports, "Ring", cls);
}
