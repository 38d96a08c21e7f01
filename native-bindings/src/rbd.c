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
  return napi_set_named_property(env, exports, "rbdAvailable", vubd_bool(env, false));
}

#else

#include <pthread.h>
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

typedef struct {
  cluster_ref *cref;
  rados_ioctx_t io;
  rbd_image_t image;
  int efd;       /* completions */
  int watch_efd; /* update watch: the image header changed (resize by another client); -1 unwatched */
  uint64_t watch_handle;
  bool open;
} rbd_handle;

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

static void handle_finalize(napi_env env, void *data, void *hint) {
  handle_close(data);
  free(data);
}

/*
 * new RbdImage({conf, user, key, keyring, pool, namespace, image, snapshot, readOnly, cache})
 * Connects (or reuses a connection) and opens the image; blocks the calling thread meanwhile.
 */
static napi_value img_ctor(napi_env env, napi_callback_info info) {
  VUBD_ARGS(1);
  char *conf = NULL, *user = NULL, *key = NULL, *keyring = NULL, *pool = NULL, *ns = NULL, *image = NULL, *snap = NULL;
  bool read_only = false, cache = false;
  napi_value ret = NULL;
  rbd_handle *h = NULL;
  napi_valuetype t;
  if (napi_typeof(env, argv[0], &t) != napi_ok || t != napi_object) return vubd_type_error(env, "options", "an object"), NULL;
  if (!get_str(env, argv[0], "conf", &conf) || !get_str(env, argv[0], "user", &user) ||
      !get_str(env, argv[0], "key", &key) || !get_str(env, argv[0], "keyring", &keyring) ||
      !get_str(env, argv[0], "pool", &pool) || !get_str(env, argv[0], "namespace", &ns) ||
      !get_str(env, argv[0], "image", &image) || !get_str(env, argv[0], "snapshot", &snap) ||
      !get_flag(env, argv[0], "readOnly", &read_only) || !get_flag(env, argv[0], "cache", &cache))
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
  if ((r = rbd_set_image_notification(h->image, h->efd, EVENT_TYPE_EVENTFD)) < 0) {
    throw_rbd(env, "rbd_set_image_notification", r);
    goto out_efd;
  }
  h->open = true;
  if (napi_wrap(env, self, h, handle_finalize, NULL, NULL) != napi_ok) {
    handle_close(h);
    free(h);
    h = NULL;
    goto out;
  }
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
  if (!((rbd_handle *)h)->open) {
    vubd_throw_errno_msg(env, EBADF, "RbdImage is closed");
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
  rbd_handle *h = get_handle(env, info, argv, 4);
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
  rbd_handle *h = get_handle(env, info, argv, 1);
  double tag;
  if (h == NULL || !get_tag(env, argv[0], &tag)) return NULL;
  rbd_op *op = new_op(tag, 0);
  if (op == NULL) return vubd_int(env, -ENOMEM);
  SUBMIT(op, rbd_aio_flush(h->image, c));
}

/* discard(offset, length, tag) / writeZeroes(offset, length, tag) -> 0 or -errno */
static napi_value range_op(napi_env env, napi_callback_info info, bool zeroes) {
  napi_value argv[3];
  rbd_handle *h = get_handle(env, info, argv, 3);
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
  rbd_handle *h = get_handle(env, info, argv, 1);
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
  if (napi_unwrap(env, self, &h) == napi_ok && h != NULL) handle_close(h);
  return NULL;
}

static napi_value g_fd(napi_env env, napi_callback_info info) {
  napi_value self;
  void *h = NULL;
  size_t argc = 0;
  if (napi_get_cb_info(env, info, &argc, NULL, &self, NULL) != napi_ok || napi_unwrap(env, self, &h) != napi_ok) return NULL;
  return vubd_int(env, ((rbd_handle *)h)->open ? ((rbd_handle *)h)->efd : -1);
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
      {"fd", NULL, NULL, g_fd, NULL, NULL, napi_default, NULL},
  };
  napi_value cls, fn;
  napi_status s = napi_define_class(env, "RbdImage", NAPI_AUTO_LENGTH, img_ctor, NULL, sizeof props / sizeof props[0],
                                    props, &cls);
  if (s != napi_ok) return s;
  if ((s = napi_set_named_property(env, exports, "RbdImage", cls)) != napi_ok) return s;
  if ((s = napi_create_function(env, "rbdConnections", NAPI_AUTO_LENGTH, rbd_connections, NULL, &fn)) != napi_ok) return s;
  if ((s = napi_set_named_property(env, exports, "rbdConnections", fn)) != napi_ok) return s;
  return napi_set_named_property(env, exports, "rbdAvailable", vubd_bool(env, true));
}

#endif
