/* eventfd notifiers and memfd guest-memory backing. */
#include "util.h"

#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

static napi_value efd_create(napi_env env, napi_callback_info info) {
  VUBD_ARGS(1);
  bool nonblock = false;
  vubd_arg_bool(env, argv[0], &nonblock);
  int fd = eventfd(0, EFD_CLOEXEC | (nonblock ? EFD_NONBLOCK : 0));
  if (fd < 0) return vubd_throw_errno(env, "eventfd", errno);
  return vubd_int(env, fd);
}

static napi_value efd_read(napi_env env, napi_callback_info info) {
  VUBD_ARGS(1);
  int32_t fd;
  if (!vubd_arg_i32(env, argv[0], "fd", &fd)) return NULL;
  uint64_t v;
  ssize_t n;
  do n = read(fd, &v, sizeof v);
  while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) return vubd_int(env, 0);
    return vubd_throw_errno(env, "read", errno);
  }
  if (n != sizeof v) return vubd_throw_errno_msg(env, EINVAL, "eventfdRead: short read (not an eventfd?)");
  return vubd_num(env, (double)v);
}

static napi_value efd_write(napi_env env, napi_callback_info info) {
  VUBD_ARGS(2);
  int32_t fd;
  uint64_t v = 1;
  napi_valuetype t;
  if (!vubd_arg_i32(env, argv[0], "fd", &fd)) return NULL;
  if (napi_typeof(env, argv[1], &t) == napi_ok && t != napi_undefined && !vubd_arg_u64(env, argv[1], "value", &v))
    return NULL;
  ssize_t n;
  do n = write(fd, &v, sizeof v);
  while (n < 0 && errno == EINTR);
  /* EAGAIN: counter saturated; the reader is already due to wake up. */
  if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) return vubd_throw_errno(env, "write", errno);
  return NULL;
}

static napi_value memfd(napi_env env, napi_callback_info info) {
  VUBD_ARGS(2);
  char name[250];
  size_t len;
  uint64_t size;
  if (napi_get_value_string_utf8(env, argv[0], name, sizeof name, &len) != napi_ok)
    return vubd_type_error(env, "name", "a string"), NULL;
  if (!vubd_arg_u64(env, argv[1], "size", &size)) return NULL;
  int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) return vubd_throw_errno(env, "memfd_create", errno);
  if (ftruncate(fd, (off_t)size) < 0) {
    int err = errno;
    close(fd);
    return vubd_throw_errno(env, "ftruncate", err);
  }
  return vubd_int(env, fd);
}

napi_status vubd_init_eventfd(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      VUBD_FN("eventfd", efd_create),
      VUBD_FN("eventfdRead", efd_read),
      VUBD_FN("eventfdWrite", efd_write),
      VUBD_FN("memfdCreate", memfd),
  };
  return napi_define_properties(env, exports, 4, props);
}
