/*
 * Ceph RBD images through librbd (optional: built only when librbd-dev is installed, see
 * binding.gyp). An RbdImage is one image handle; its completions go to an eventfd
 * (rbd_set_image_notification) and are collected with poll(), so no librbd thread ever calls into
 * JavaScript. Cluster connections (rados_t) are shared process-wide by identical connection
 * settings and reference counted; each handle has its own ioctx and image.
 */
#include "util.h"

#ifndef VUBD_HAVE_RBD

static napi_value no_rbd(napi_env env, napi_callback_info info) {
  return vubd_throw_errno_msg(env, ENOSYS,
                              "the rbd driver needs librbd (Debian package librbd-dev; rebuild vubd with npm run build:native)");
}

napi_status vubd_init_rbd(napi_env env, napi_value exports) {
  napi_value cls;
  napi_status s = napi_define_class(env, "RbdImage", NAPI_AUTO_LENGTH, no_rbd, NULL, 0, NULL, &cls);
  if (s != napi_ok) return s;
  if ((s = napi_set_named_property(env, exports, "RbdImage", cls)) != napi_ok) return s;
  if ((s = napi_define_class(env, "RbdQueue", NAPI_AUTO_LENGTH, no_rbd, NULL, 0, NULL, &cls)) != napi_ok) return s;
  if ((s = napi_set_named_property(env, exports, "RbdQueue", cls)) != napi_ok) return s;
  return napi_set_named_property(env, exports, "rbdAvailable", vubd_bool(env, false));
}

#else

#include <pthread.h>
#include <stdatomic.h>
#include <rados/librados.h>
#include <rbd/librbd.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>

#define RBD_MAX_SEGS 1024
#define POLL_BATCH 64

typedef struct cluster_ref {
  struct cluster_ref *next;
  char *key; /* the connection settings, NUL-separated */
  size_t key_len;
  rados_t cluster;
  int refs;
} cluster_ref;

static pthread_mutex_t clusters_lock = PTHREAD_MUTEX_INITIALIZER;
static cluster_ref *clusters;

typedef struct rbd_handle {
  cluster_ref *cref;
  rados_ioctx_t io;
  rbd_image_t image;
  int efd;       /* completions of the opener's own operations */
  int watch_efd; /* update watch: the image header changed (resize by another client); -1 unwatched */
  uint64_t watch_handle;
  bool open;
  bool notify; /* its own I/O completes through the eventfd; false: shared, I/O through RbdQueues only */
  /* The opener (an RbdImage) and every RbdQueue attached to it; the image closes with the last. */
  int refs;
  uint32_t id; /* what share() gives and RbdQueue takes; 0: not shared yet */
  struct rbd_handle *next_shared;
} rbd_handle;

/* Shared handles by id (guarded by clusters_lock: attach and detach only, never the I/O path). */
static rbd_handle *shared;
static uint32_t next_share_id = 1;

/* The JavaScript RbdImage: the opener's reference (NULL once closed). */
typedef struct {
  rbd_handle *h;
} img_obj;

/* One operation in flight: librbd keeps reading through the iovec array until a readv completes. */
typedef struct {
  double tag;
  uint64_t write_len; /* a write succeeds with 0 from librbd; we report the bytes, as pwritev does */
  int iovcnt;
  struct iovec iov[];
} rbd_op;

static void cluster_put(cluster_ref *c) {
  pthread_mutex_lock(&clusters_lock);
  if (--c->refs == 0) {
    for (cluster_ref **p = &clusters; *p; p = &(*p)->next)
      if (*p == c) {
        *p = c->next;
        break;
      }
  } else {
    c = NULL;
  }
  pthread_mutex_unlock(&clusters_lock);
  if (c) {
    rados_shutdown(c->cluster);
    free(c->key);
    free(c);
  }
}

/* Reads string property `name` of obj into a fresh buffer; NULL (no exception) when absent/undefined. */
static bool get_str(napi_env env, napi_value obj, const char *name, char **out) {
  *out = NULL;
  napi_value v;
  napi_valuetype t;
  if (napi_get_named_property(env, obj, name, &v) != napi_ok || napi_typeof(env, v, &t) != napi_ok) return false;
  if (t == napi_undefined || t == napi_null) return true;
  if (t != napi_string) return vubd_type_error(env, name, "a string");
  size_t len;
  if (napi_get_value_string_utf8(env, v, NULL, 0, &len) != napi_ok) return false;
  *out = malloc(len + 1);
  if (*out == NULL) return vubd_throw_errno(env, "malloc", ENOMEM), false;
  napi_get_value_string_utf8(env, v, *out, len + 1, &len);
  return true;
}

static bool get_flag(napi_env env, napi_value obj, const char *name, bool *out) {
  napi_value v;
  *out = false;
  return napi_get_named_property(env, obj, name, &v) == napi_ok && vubd_arg_bool(env, v, out);
}

static napi_value throw_rbd(napi_env env, const char *what, int r) { return vubd_throw_errno(env, what, r < 0 ? -r : r); }

/* Finds or makes the shared connection for these settings. Returns 0 or -errno, *what names the failed step. */
static int cluster_get(const char *conf, const char *user, const char *key, const char *keyring, bool cache,
                       cluster_ref **out, const char **what) {
  const char *parts[5] = {conf ? conf : "", user ? user : "admin", key ? key : "", keyring ? keyring : "",
                          cache ? "1" : "0"};
  size_t len = 0;
  for (int i = 0; i < 5; i++) len += strlen(parts[i]) + 1;
  char *k = malloc(len);
  if (k == NULL) return -ENOMEM;
  size_t o = 0;
  for (int i = 0; i < 5; i++) {
    size_t l = strlen(parts[i]) + 1;
    memcpy(k + o, parts[i], l);
    o += l;
  }
  pthread_mutex_lock(&clusters_lock);
  for (cluster_ref *c = clusters; c; c = c->next)
    if (c->key_len == len && memcmp(c->key, k, len) == 0) {
      c->refs++;
      pthread_mutex_unlock(&clusters_lock);
      free(k);
      *out = c;
      return 0;
    }
  /* Connecting under the lock keeps two threads from making two connections for one node. */
  cluster_ref *c = calloc(1, sizeof *c);
  int r = -ENOMEM;
  if (c == NULL) goto fail;
  char name[300];
  snprintf(name, sizeof name, "client.%s", parts[1]);
  *what = "rados_create2";
  if ((r = rados_create2(&c->cluster, "ceph", name, 0)) < 0) goto fail;
  /* Bounded defaults a conf file may override: a missing monitor fails the open instead of waiting 300 s. */
  rados_conf_set(c->cluster, "client_mount_timeout", "15");
  *what = "rados_conf_read_file";
  if ((r = rados_conf_read_file(c->cluster, conf && *conf ? conf : NULL)) < 0 && conf && *conf) goto fail_shutdown;
  *what = "rados_conf_set";
  if (key && *key && (r = rados_conf_set(c->cluster, "key", key)) < 0) goto fail_shutdown;
  if (keyring && *keyring && (r = rados_conf_set(c->cluster, "keyring", keyring)) < 0) goto fail_shutdown;
  if ((r = rados_conf_set(c->cluster, "rbd_cache", cache ? "true" : "false")) < 0) goto fail_shutdown;
  *what = "rados_connect";
  if ((r = rados_connect(c->cluster)) < 0) goto fail_shutdown;
  c->key = k;
  c->key_len = len;
  c->refs = 1;
  c->next = clusters;
  clusters = c;
  pthread_mutex_unlock(&clusters_lock);
  *out = c;
  return 0;
fail_shutdown:
  rados_shutdown(c->cluster);
fail:
  pthread_mutex_unlock(&clusters_lock);
  free(c);
  free(k);
  return r;
}

static void handle_close(rbd_handle *h) {
  if (!h->open) return;
  h->open = false;
  if (h->watch_efd >= 0) {
    rbd_update_unwatch(h->image, h->watch_handle);
    close(h->watch_efd);
    h->watch_efd = -1;
  }
  /* Completions nobody collected (abandoned requests): release them and their ops. */
  rbd_completion_t comps[POLL_BATCH];
  int n;
  while ((n = rbd_poll_io_events(h->image, comps, POLL_BATCH)) > 0)
    for (int i = 0; i < n; i++) {
      free(rbd_aio_get_arg(comps[i]));
      rbd_aio_release(comps[i]);
    }
  rbd_close(h->image); /* waits for what is still in flight */
  rados_ioctx_destroy(h->io);
  close(h->efd);
  cluster_put(h->cref);
}

/* Drops one reference; the last closes the image (it may be any thread's: rbd_close waits for its I/O). */
static void handle_unref(rbd_handle *h) {
  pthread_mutex_lock(&clusters_lock);
  bool last = --h->refs == 0;
  if (last)
    for (rbd_handle **p = &shared; *p; p = &(*p)->next_shared)
      if (*p == h) {
        *p = h->next_shared;
        break;
      }
  pthread_mutex_unlock(&clusters_lock);
  if (!last) return;
  handle_close(h);
  free(h);
}

static void obj_release(img_obj *o) {
  if (o->h == NULL) return;
  rbd_handle *h = o->h;
  o->h = NULL;
  handle_unref(h);
}

static void handle_finalize(napi_env env, void *data, void *hint) {
  obj_release(data);
  free(data);
}

/*
 * new RbdImage({conf, user, key, keyring, pool, namespace, image, snapshot, readOnly, cache})
 * Connects (or reuses a connection) and opens the image; blocks the calling thread meanwhile.
 */
static napi_value img_ctor(napi_env env, napi_callback_info info) {
  VUBD_ARGS(1);
  char *conf = NULL, *user = NULL, *key = NULL, *keyring = NULL, *pool = NULL, *ns = NULL, *image = NULL, *snap = NULL;
  bool read_only = false, cache = false, share = false;
  napi_value ret = NULL;
  rbd_handle *h = NULL;
  napi_valuetype t;
  if (napi_typeof(env, argv[0], &t) != napi_ok || t != napi_object) return vubd_type_error(env, "options", "an object"), NULL;
  if (!get_str(env, argv[0], "conf", &conf) || !get_str(env, argv[0], "user", &user) ||
      !get_str(env, argv[0], "key", &key) || !get_str(env, argv[0], "keyring", &keyring) ||
      !get_str(env, argv[0], "pool", &pool) || !get_str(env, argv[0], "namespace", &ns) ||
      !get_str(env, argv[0], "image", &image) || !get_str(env, argv[0], "snapshot", &snap) ||
      !get_flag(env, argv[0], "readOnly", &read_only) || !get_flag(env, argv[0], "cache", &cache) || !get_flag(env, argv[0], "shared", &share))
    goto out;
  if (pool == NULL || image == NULL) {
    vubd_throw_errno_msg(env, EINVAL, "RbdImage: pool and image are required");
    goto out;
  }
  h = calloc(1, sizeof *h);
  if (h == NULL) {
    vubd_throw_errno(env, "RbdImage", ENOMEM);
    goto out;
  }
  h->efd = h->watch_efd = -1;
  const char *what = "connect";
  int r = cluster_get(conf, user, key, keyring, cache, &h->cref, &what);
  if (r < 0) {
    throw_rbd(env, what, r);
    goto out;
  }
  if ((r = rados_ioctx_create(h->cref->cluster, pool, &h->io)) < 0) {
    char msg[400];
    snprintf(msg, sizeof msg, "rados_ioctx_create(pool '%s')", pool);
    throw_rbd(env, msg, r);
    goto out_cluster;
  }
  if (ns && *ns) rados_ioctx_set_namespace(h->io, ns);
  r = read_only || snap ? rbd_open_read_only(h->io, image, &h->image, snap) : rbd_open(h->io, image, &h->image, NULL);
  if (r < 0) {
    char msg[600];
    snprintf(msg, sizeof msg, "rbd_open('%s/%s%s%s')", pool, image, snap ? "@" : "", snap ? snap : "");
    throw_rbd(env, msg, r);
    goto out_io;
  }
  h->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (h->efd < 0) {
    vubd_throw_errno(env, "eventfd", errno);
    goto out_image;
  }
  /*
   * With a notification set, librbd also queues every completion for rbd_poll_io_events, even one
   * with a callback (an RbdQueue's): a shared image must have none.
   */
  if (!share && (r = rbd_set_image_notification(h->image, h->efd, EVENT_TYPE_EVENTFD)) < 0) {
    throw_rbd(env, "rbd_set_image_notification", r);
    goto out_efd;
  }
  h->notify = !share;
  h->open = true;
  h->refs = 1;
  img_obj *o = malloc(sizeof *o);
  if (o == NULL || napi_wrap(env, self, o, handle_finalize, NULL, NULL) != napi_ok) {
    free(o);
    handle_close(h);
    free(h);
    h = NULL;
    if (o == NULL) vubd_throw_errno(env, "RbdImage", ENOMEM);
    goto out;
  }
  o->h = h;
  h = NULL;
  ret = self;
  goto out;
out_efd:
  close(h->efd);
out_image:
  rbd_close(h->image);
out_io:
  rados_ioctx_destroy(h->io);
out_cluster:
  cluster_put(h->cref);
out:
  free(h);
  free(conf);
  free(user);
  free(key);
  free(keyring);
  free(pool);
  free(ns);
  free(image);
  free(snap);
  return ret;
}

static rbd_handle *get_handle(napi_env env, napi_callback_info info, napi_value *argv, size_t n) {
  size_t argc = n;
  napi_value self;
  void *h = NULL;
  if (napi_get_cb_info(env, info, &argc, argv, &self, NULL) != napi_ok) return NULL;
  if (napi_unwrap(env, self, &h) != napi_ok || h == NULL) {
    napi_throw_type_error(env, "ERR_INVALID_THIS", "not an RbdImage");
    return NULL;
  }
  if (((img_obj *)h)->h == NULL) {
    vubd_throw_errno_msg(env, EBADF, "RbdImage is closed");
    return NULL;
  }
  return ((img_obj *)h)->h;
}

/* The handle for its own I/O: refused on a shared image, whose I/O goes through RbdQueues. */
static rbd_handle *get_io_handle(napi_env env, napi_callback_info info, napi_value *argv, size_t n) {
  rbd_handle *h = get_handle(env, info, argv, n);
  if (h != NULL && !h->notify) {
    vubd_throw_errno_msg(env, EINVAL, "this RbdImage was opened shared: submit I/O through an RbdQueue");
    return NULL;
  }
  return h;
}

static bool get_tag(napi_env env, napi_value v, double *tag) {
  uint64_t t;
  if (!vubd_arg_u64(env, v, "tag", &t)) return false;
  *tag = (double)t;
  return true;
}

static rbd_op *new_op(double tag, int iovcnt) {
  rbd_op *op = malloc(sizeof *op + (size_t)iovcnt * sizeof(struct iovec));
  if (op) {
    op->tag = tag;
    op->write_len = 0;
    op->iovcnt = iovcnt;
  }
  return op;
}

/* Submits through fn with a fresh completion; returns 0 or -errno (the caller completes the tag with it). */
#define SUBMIT(op, call)                                            \
  do {                                                              \
    rbd_completion_t c;                                             \
    int r_ = rbd_aio_create_completion((op), NULL, &c);             \
    if (r_ < 0) {                                                   \
      free(op);                                                     \
      return vubd_int(env, r_);                                     \
    }                                                               \
    r_ = (call);                                                    \
    if (r_ < 0) {                                                   \
      rbd_aio_release(c);                                           \
      free(op);                                                     \
      return vubd_int(env, r_);                                     \
    }                                                               \
    return vubd_int(env, 0);                                        \
  } while (0)

/* readv/writev(iov Float64Array [addr, len, ...], iovCount, offset, tag) -> 0 or -errno */
static napi_value rw(napi_env env, napi_callback_info info, bool write) {
  napi_value argv[4];
  rbd_handle *h = get_io_handle(env, info, argv, 4);
  void *data;
  size_t n;
  int32_t cnt;
  uint64_t off;
  double tag;
  if (h == NULL || !vubd_arg_typed(env, argv[0], "iov", napi_float64_array, "a Float64Array", &data, &n) ||
      !vubd_arg_i32(env, argv[1], "iovCount", &cnt) || !vubd_arg_u64(env, argv[2], "offset", &off) ||
      !get_tag(env, argv[3], &tag))
    return NULL;
  if (cnt < 1 || cnt > RBD_MAX_SEGS || (size_t)cnt * 2 > n) return vubd_range_error(env, "iovCount", "is out of range"), NULL;
  rbd_op *op = new_op(tag, cnt);
  if (op == NULL) return vubd_int(env, -ENOMEM);
  const double *iv = data;
  uint64_t total = 0;
  for (int i = 0; i < cnt; i++) {
    op->iov[i].iov_base = (void *)(uintptr_t)iv[2 * i];
    op->iov[i].iov_len = (size_t)iv[2 * i + 1];
    total += op->iov[i].iov_len;
  }
  if (write) op->write_len = total;
  if (write) SUBMIT(op, rbd_aio_writev(h->image, op->iov, cnt, off, c));
  SUBMIT(op, rbd_aio_readv(h->image, op->iov, cnt, off, c));
}

static napi_value m_readv(napi_env env, napi_callback_info info) { return rw(env, info, false); }
static napi_value m_writev(napi_env env, napi_callback_info info) { return rw(env, info, true); }

static napi_value m_flush(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  rbd_handle *h = get_io_handle(env, info, argv, 1);
  double tag;
  if (h == NULL || !get_tag(env, argv[0], &tag)) return NULL;
  rbd_op *op = new_op(tag, 0);
  if (op == NULL) return vubd_int(env, -ENOMEM);
  SUBMIT(op, rbd_aio_flush(h->image, c));
}

/* discard(offset, length, tag) / writeZeroes(offset, length, tag) -> 0 or -errno */
static napi_value range_op(napi_env env, napi_callback_info info, bool zeroes) {
  napi_value argv[3];
  rbd_handle *h = get_io_handle(env, info, argv, 3);
  uint64_t off, len;
  double tag;
  if (h == NULL || !vubd_arg_u64(env, argv[0], "offset", &off) || !vubd_arg_u64(env, argv[1], "length", &len) ||
      !get_tag(env, argv[2], &tag))
    return NULL;
  rbd_op *op = new_op(tag, 0);
  if (op == NULL) return vubd_int(env, -ENOMEM);
  if (zeroes) SUBMIT(op, rbd_aio_write_zeroes(h->image, off, len, c, 0, 0));
  SUBMIT(op, rbd_aio_discard(h->image, off, len, c));
}

static napi_value m_discard(napi_env env, napi_callback_info info) { return range_op(env, info, false); }
static napi_value m_write_zeroes(napi_env env, napi_callback_info info) { return range_op(env, info, true); }

/*
 * poll(out Float64Array) -> count: completed operations as [tag, res, tag, res, ...] (res: bytes of
 * a read or write, 0, or -errno). When out fills up the eventfd is re-armed, so the caller's poll wakes again.
 */
static napi_value m_poll(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  rbd_handle *h = get_io_handle(env, info, argv, 1);
  void *data;
  size_t n;
  if (h == NULL || !vubd_arg_typed(env, argv[0], "out", napi_float64_array, "a Float64Array", &data, &n)) return NULL;
  double *out = data;
  size_t max = n / 2, count = 0;
  uint64_t v;
  if (read(h->efd, &v, sizeof v) < 0 && errno != EAGAIN) return vubd_throw_errno(env, "read(eventfd)", errno);
  rbd_completion_t comps[POLL_BATCH];
  while (count < max) {
    int want = (int)(max - count < POLL_BATCH ? max - count : POLL_BATCH);
    int got = rbd_poll_io_events(h->image, comps, want);
    if (got <= 0) break;
    for (int i = 0; i < got; i++) {
      rbd_op *op = rbd_aio_get_arg(comps[i]);
      ssize_t res = rbd_aio_get_return_value(comps[i]);
      rbd_aio_release(comps[i]);
      out[2 * count] = op->tag;
      out[2 * count + 1] = res == 0 && op->write_len > 0 ? (double)op->write_len : (double)res;
      free(op);
      count++;
    }
    if (got < want) break;
  }
  if (count == max) {
    v = 1;
    if (write(h->efd, &v, sizeof v) < 0 && errno != EAGAIN) return vubd_throw_errno(env, "write(eventfd)", errno);
  }
  return vubd_num(env, (double)count);
}

static napi_value m_size(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  rbd_handle *h = get_handle(env, info, argv, 0);
  uint64_t size;
  if (h == NULL) return NULL;
  int r = rbd_get_size(h->image, &size);
  if (r < 0) return throw_rbd(env, "rbd_get_size", r);
  return vubd_num(env, (double)size);
}

static napi_value m_resize(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  rbd_handle *h = get_handle(env, info, argv, 1);
  uint64_t size;
  if (h == NULL || !vubd_arg_u64(env, argv[0], "size", &size)) return NULL;
  int r = rbd_resize(h->image, size);
  if (r < 0) return throw_rbd(env, "rbd_resize", r);
  return NULL;
}

static void on_update(void *arg) {
  uint64_t one = 1;
  ssize_t n = write(*(int *)arg, &one, sizeof one);
  (void)n;
}

/* watch() -> fd: readable (eventfd counter) whenever the image header changes, e.g. another client resized it. */
static napi_value m_watch(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  rbd_handle *h = get_handle(env, info, argv, 0);
  if (h == NULL) return NULL;
  if (h->watch_efd >= 0) return vubd_int(env, h->watch_efd);
  h->watch_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (h->watch_efd < 0) return vubd_throw_errno(env, "eventfd", errno);
  int r = rbd_update_watch(h->image, &h->watch_handle, on_update, &h->watch_efd);
  if (r < 0) {
    close(h->watch_efd);
    h->watch_efd = -1;
    return throw_rbd(env, "rbd_update_watch", r);
  }
  return vubd_int(env, h->watch_efd);
}

static napi_value m_close(napi_env env, napi_callback_info info) {
  napi_value self;
  void *h = NULL;
  size_t argc = 0;
  if (napi_get_cb_info(env, info, &argc, NULL, &self, NULL) != napi_ok) return NULL;
  if (napi_unwrap(env, self, &h) == napi_ok && h != NULL) obj_release(h);
  return NULL;
}

static napi_value g_fd(napi_env env, napi_callback_info info) {
  napi_value self;
  void *h = NULL;
  size_t argc = 0;
  if (napi_get_cb_info(env, info, &argc, NULL, &self, NULL) != napi_ok || napi_unwrap(env, self, &h) != napi_ok) return NULL;
  rbd_handle *rh = ((img_obj *)h)->h;
  return vubd_int(env, rh != NULL && rh->notify ? rh->efd : -1);
}

/* share() -> id: a number any thread of the process can attach an RbdQueue to while the image is open. */
static napi_value m_share(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  rbd_handle *h = get_handle(env, info, argv, 0);
  if (h == NULL) return NULL;
  if (h->notify) return vubd_throw_errno_msg(env, EINVAL, "only an RbdImage opened with shared: true can be shared");
  pthread_mutex_lock(&clusters_lock);
  if (h->id == 0) {
    h->id = next_share_id++;
    h->next_shared = shared;
    shared = h;
  }
  uint32_t id = h->id;
  pthread_mutex_unlock(&clusters_lock);
  return vubd_num(env, id);
}

/*
 * RbdQueue: one queue context's submissions to a shared image. librbd calls back on its own
 * thread when an operation completes; the callback pushes the operation onto the queue's lock-free
 * list and signals the queue's eventfd, which the owning worker polls. The queue lives until its
 * owner closed it and its last operation called back.
 */
typedef struct rbd_qop {
  struct rbd_qop *next;
  struct rbd_queue *q;
  double tag;
  double res;
  uint64_t write_len;
  struct iovec iov[];
} rbd_qop;

typedef struct rbd_queue {
  rbd_handle *h;
  int efd;
  _Atomic(rbd_qop *) done; /* pushed by librbd's callback thread, newest first */
  rbd_qop *head, *tail;    /* the owner's: taken from done, oldest first, not yet handed out */
  _Atomic int refs;        /* the owner's and one per operation in flight */
  bool open;
} rbd_queue;

static void free_ops(rbd_qop *op) {
  while (op) {
    rbd_qop *next = op->next;
    free(op);
    op = next;
  }
}

static void queue_unref(rbd_queue *q) {
  if (atomic_fetch_sub(&q->refs, 1) != 1) return;
  free_ops(atomic_exchange(&q->done, NULL));
  free_ops(q->head);
  close(q->efd);
  free(q);
}

static void queue_complete(rbd_completion_t c, void *arg) {
  rbd_qop *op = arg;
  rbd_queue *q = op->q;
  ssize_t r = rbd_aio_get_return_value(c);
  rbd_aio_release(c);
  op->res = r == 0 && op->write_len > 0 ? (double)op->write_len : (double)r;
  rbd_qop *head = atomic_load(&q->done);
  do op->next = head;
  while (!atomic_compare_exchange_weak(&q->done, &head, op));
  uint64_t one = 1;
  ssize_t n = write(q->efd, &one, sizeof one);
  (void)n;
  queue_unref(q);
}

/* The JavaScript RbdQueue: the owner's reference (NULL once closed; the queue itself may be gone then). */
typedef struct {
  rbd_queue *q;
} queue_obj;

static void queue_finalize(napi_env env, void *data, void *hint);

static void queue_close(rbd_queue *q) {
  q->open = false;
  rbd_handle *h = q->h;
  q->h = NULL;
  handle_unref(h); /* the last reference closes the image, which waits for this queue's operations */
  queue_unref(q);
}

/* new RbdQueue(id): attaches to the shared image `id`; throws if it is no longer open. */
static napi_value queue_ctor(napi_env env, napi_callback_info info) {
  VUBD_ARGS(1);
  uint32_t id;
  if (!vubd_arg_u32(env, argv[0], "id", &id)) return NULL;
  rbd_queue *q = calloc(1, sizeof *q);
  if (q == NULL) return vubd_throw_errno(env, "RbdQueue", ENOMEM);
  q->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (q->efd < 0) {
    free(q);
    return vubd_throw_errno(env, "eventfd", errno);
  }
  pthread_mutex_lock(&clusters_lock);
  for (rbd_handle *h = shared; h; h = h->next_shared)
    if (h->id == id && h->refs > 0) {
      h->refs++;
      q->h = h;
      break;
    }
  pthread_mutex_unlock(&clusters_lock);
  if (q->h == NULL) {
    close(q->efd);
    free(q);
    return vubd_throw_errno_msg(env, EBADF, "RbdQueue: the rbd image is no longer open");
  }
  atomic_init(&q->done, NULL);
  atomic_init(&q->refs, 1);
  q->open = true;
  queue_obj *o = malloc(sizeof *o);
  if (o == NULL || napi_wrap(env, self, o, queue_finalize, NULL, NULL) != napi_ok) {
    free(o);
    queue_close(q);
    return o == NULL ? vubd_throw_errno(env, "RbdQueue", ENOMEM) : NULL;
  }
  o->q = q;
  return self;
}

static void obj_close_queue(queue_obj *o) {
  if (o->q == NULL) return;
  rbd_queue *q = o->q;
  o->q = NULL;
  queue_close(q);
}

static void queue_finalize(napi_env env, void *data, void *hint) {
  obj_close_queue(data);
  free(data);
}

static rbd_queue *get_queue(napi_env env, napi_callback_info info, napi_value *argv, size_t n) {
  size_t argc = n;
  napi_value self;
  void *q = NULL;
  if (napi_get_cb_info(env, info, &argc, argv, &self, NULL) != napi_ok) return NULL;
  if (napi_unwrap(env, self, &q) != napi_ok || q == NULL) {
    napi_throw_type_error(env, "ERR_INVALID_THIS", "not an RbdQueue");
    return NULL;
  }
  if (((queue_obj *)q)->q == NULL) {
    vubd_throw_errno_msg(env, EBADF, "RbdQueue is closed");
    return NULL;
  }
  return ((queue_obj *)q)->q;
}

static rbd_qop *queue_op(rbd_queue *q, double tag, int iovcnt) {
  rbd_qop *op = malloc(sizeof *op + (size_t)iovcnt * sizeof(struct iovec));
  if (op == NULL) return NULL;
  op->q = q;
  op->tag = tag;
  op->write_len = 0;
  atomic_fetch_add(&q->refs, 1);
  return op;
}

/* Submits with a completion that calls back into the queue; returns 0 or -errno (the caller completes the tag with it). */
#define QSUBMIT(q, op, call)                                                 \
  do {                                                                       \
    rbd_completion_t c;                                                      \
    int r_ = rbd_aio_create_completion((op), queue_complete, &c);           \
    if (r_ >= 0) {                                                           \
      r_ = (call);                                                           \
      if (r_ >= 0) return vubd_int(env, 0);                                  \
      rbd_aio_release(c);                                                    \
    }                                                                        \
    free(op);                                                                \
    queue_unref(q);                                                          \
    return vubd_int(env, r_);                                                \
  } while (0)

static napi_value q_rw(napi_env env, napi_callback_info info, bool write) {
  napi_value argv[4];
  rbd_queue *q = get_queue(env, info, argv, 4);
  void *data;
  size_t n;
  int32_t cnt;
  uint64_t off;
  double tag;
  if (q == NULL || !vubd_arg_typed(env, argv[0], "iov", napi_float64_array, "a Float64Array", &data, &n) ||
      !vubd_arg_i32(env, argv[1], "iovCount", &cnt) || !vubd_arg_u64(env, argv[2], "offset", &off) ||
      !get_tag(env, argv[3], &tag))
    return NULL;
  if (cnt < 1 || cnt > RBD_MAX_SEGS || (size_t)cnt * 2 > n) return vubd_range_error(env, "iovCount", "is out of range"), NULL;
  rbd_qop *op = queue_op(q, tag, cnt);
  if (op == NULL) return vubd_int(env, -ENOMEM);
  const double *iv = data;
  uint64_t total = 0;
  for (int i = 0; i < cnt; i++) {
    op->iov[i].iov_base = (void *)(uintptr_t)iv[2 * i];
    op->iov[i].iov_len = (size_t)iv[2 * i + 1];
    total += op->iov[i].iov_len;
  }
  if (write) {
    op->write_len = total;
    QSUBMIT(q, op, rbd_aio_writev(q->h->image, op->iov, cnt, off, c));
  }
  QSUBMIT(q, op, rbd_aio_readv(q->h->image, op->iov, cnt, off, c));
}

static napi_value q_readv(napi_env env, napi_callback_info info) { return q_rw(env, info, false); }
static napi_value q_writev(napi_env env, napi_callback_info info) { return q_rw(env, info, true); }

static napi_value q_flush(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  rbd_queue *q = get_queue(env, info, argv, 1);
  double tag;
  if (q == NULL || !get_tag(env, argv[0], &tag)) return NULL;
  rbd_qop *op = queue_op(q, tag, 0);
  if (op == NULL) return vubd_int(env, -ENOMEM);
  QSUBMIT(q, op, rbd_aio_flush(q->h->image, c));
}

static napi_value q_range(napi_env env, napi_callback_info info, bool zeroes) {
  napi_value argv[3];
  rbd_queue *q = get_queue(env, info, argv, 3);
  uint64_t off, len;
  double tag;
  if (q == NULL || !vubd_arg_u64(env, argv[0], "offset", &off) || !vubd_arg_u64(env, argv[1], "length", &len) ||
      !get_tag(env, argv[2], &tag))
    return NULL;
  rbd_qop *op = queue_op(q, tag, 0);
  if (op == NULL) return vubd_int(env, -ENOMEM);
  if (zeroes) QSUBMIT(q, op, rbd_aio_write_zeroes(q->h->image, off, len, c, 0, 0));
  QSUBMIT(q, op, rbd_aio_discard(q->h->image, off, len, c));
}

static napi_value q_discard(napi_env env, napi_callback_info info) { return q_range(env, info, false); }
static napi_value q_write_zeroes(napi_env env, napi_callback_info info) { return q_range(env, info, true); }

/* poll(out Float64Array) -> count, as RbdImage.poll; completions come out in the order they completed. */
static napi_value q_poll(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  rbd_queue *q = get_queue(env, info, argv, 1);
  void *data;
  size_t n;
  if (q == NULL || !vubd_arg_typed(env, argv[0], "out", napi_float64_array, "a Float64Array", &data, &n)) return NULL;
  uint64_t v;
  if (read(q->efd, &v, sizeof v) < 0 && errno != EAGAIN) return vubd_throw_errno(env, "read(eventfd)", errno);
  rbd_qop *fresh = atomic_exchange(&q->done, NULL), *rev = NULL;
  if (fresh) {
    rbd_qop *last = fresh;
    while (fresh) {
      rbd_qop *next = fresh->next;
      fresh->next = rev;
      rev = fresh;
      fresh = next;
    }
    if (q->tail) q->tail->next = rev;
    else q->head = rev;
    q->tail = last;
  }
  double *out = data;
  size_t max = n / 2, count = 0;
  while (count < max && q->head) {
    rbd_qop *op = q->head;
    q->head = op->next;
    if (q->head == NULL) q->tail = NULL;
    out[2 * count] = op->tag;
    out[2 * count + 1] = op->res;
    free(op);
    count++;
  }
  if (q->head) {
    v = 1;
    if (write(q->efd, &v, sizeof v) < 0 && errno != EAGAIN) return vubd_throw_errno(env, "write(eventfd)", errno);
  }
  return vubd_num(env, (double)count);
}

static napi_value q_close(napi_env env, napi_callback_info info) {
  napi_value self;
  void *q = NULL;
  size_t argc = 0;
  if (napi_get_cb_info(env, info, &argc, NULL, &self, NULL) != napi_ok) return NULL;
  if (napi_unwrap(env, self, &q) == napi_ok && q != NULL) obj_close_queue(q);
  return NULL;
}

static napi_value q_fd(napi_env env, napi_callback_info info) {
  napi_value self;
  void *q = NULL;
  size_t argc = 0;
  if (napi_get_cb_info(env, info, &argc, NULL, &self, NULL) != napi_ok || napi_unwrap(env, self, &q) != napi_ok) return NULL;
  rbd_queue *rq = ((queue_obj *)q)->q;
  return vubd_int(env, rq != NULL ? rq->efd : -1);
}

/* connections alive in the process (tests check that closing every image shuts them down) */
static napi_value rbd_connections(napi_env env, napi_callback_info info) {
  int n = 0;
  pthread_mutex_lock(&clusters_lock);
  for (cluster_ref *c = clusters; c; c = c->next) n++;
  pthread_mutex_unlock(&clusters_lock);
  return vubd_int(env, n);
}

napi_status vubd_init_rbd(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      VUBD_METHOD("readv", m_readv),
      VUBD_METHOD("writev", m_writev),
      VUBD_METHOD("flush", m_flush),
      VUBD_METHOD("discard", m_discard),
      VUBD_METHOD("writeZeroes", m_write_zeroes),
      VUBD_METHOD("poll", m_poll),
      VUBD_METHOD("size", m_size),
      VUBD_METHOD("resize", m_resize),
      VUBD_METHOD("watch", m_watch),
      VUBD_METHOD("close", m_close),
      VUBD_METHOD("share", m_share),
      {"fd", NULL, NULL, g_fd, NULL, NULL, napi_default, NULL},
  };
  napi_property_descriptor qprops[] = {
      VUBD_METHOD("readv", q_readv),
      VUBD_METHOD("writev", q_writev),
      VUBD_METHOD("flush", q_flush),
      VUBD_METHOD("discard", q_discard),
      VUBD_METHOD("writeZeroes", q_write_zeroes),
      VUBD_METHOD("poll", q_poll),
      VUBD_METHOD("close", q_close),
      {"fd", NULL, NULL, q_fd, NULL, NULL, napi_default, NULL},
  };
  napi_value cls, qcls, fn;
  napi_status s = napi_define_class(env, "RbdImage", NAPI_AUTO_LENGTH, img_ctor, NULL, sizeof props / sizeof props[0],
                                    props, &cls);
  if (s != napi_ok) return s;
  if ((s = napi_set_named_property(env, exports, "RbdImage", cls)) != napi_ok) return s;
  s = napi_define_class(env, "RbdQueue", NAPI_AUTO_LENGTH, queue_ctor, NULL, sizeof qprops / sizeof qprops[0], qprops, &qcls);
  if (s != napi_ok) return s;
  if ((s = napi_set_named_property(env, exports, "RbdQueue", qcls)) != napi_ok) return s;
  if ((s = napi_create_function(env, "rbdConnections", NAPI_AUTO_LENGTH, rbd_connections, NULL, &fn)) != napi_ok) return s;
  if ((s = napi_set_named_property(env, exports, "rbdConnections", fn)) != napi_ok) return s;
  return napi_set_named_property(env, exports, "rbdAvailable", vubd_bool(env, true));
}

#endif
