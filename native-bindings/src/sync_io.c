/* Synchronous block I/O fallback: returns bytes or -errno, never throws for I/O errors. */
#include "util.h"

#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/mount.h> /* BLKGETSIZE64 */
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define VUBD_IOV_MAX 1024

/* Parses (iov, iovCount, fileOffset); returns 0 or -errno for a bad count/offset, -1000 after a throw. */
#define ARG_THROWN (-1000)
static int get_iov(napi_env env, napi_value *argv, struct iovec *out, uint32_t *count, off_t *off) {
  void *data;
  size_t n;
  int32_t cnt;
  double off_d;
  if (!vubd_arg_typed(env, argv[0], "iov", napi_float64_array, "a Float64Array", &data, &n) ||
      !vubd_arg_i32(env, argv[1], "iovCount", &cnt))
    return ARG_THROWN;
  if (napi_get_value_double(env, argv[2], &off_d) != napi_ok) return vubd_type_error(env, "fileOffset", "a number"), ARG_THROWN;
  if (cnt < 0 || cnt > VUBD_IOV_MAX || (size_t)cnt > n / 2) return -EINVAL;
  if (!(off_d >= 0 && off_d <= VUBD_MAX_SAFE) || (double)(int64_t)off_d != off_d) return -EINVAL;
  const double *v = data;
  for (int32_t i = 0; i < cnt; i++) {
    out[i].iov_base = (void *)(uintptr_t)v[2 * i];
    out[i].iov_len = (size_t)v[2 * i + 1];
  }
  *count = (uint32_t)cnt;
  *off = (off_t)off_d;
  return 0;
}

/* Loops over short transfers; stops at EOF (returns the short count). */
static napi_value rw(napi_env env, napi_callback_info info, bool write) {
  VUBD_ARGS(4);
  int32_t fd;
  struct iovec iov[VUBD_IOV_MAX];
  uint32_t cnt;
  off_t off;
  if (!vubd_arg_i32(env, argv[0], "fd", &fd)) return NULL;
  int r = get_iov(env, argv + 1, iov, &cnt, &off);
  if (r == ARG_THROWN) return NULL;
  if (r < 0) return vubd_int(env, r);
  uint64_t done = 0;
  uint32_t i = 0;
  for (;;) {
    while (i < cnt && iov[i].iov_len == 0) i++;
    if (i == cnt) break;
    ssize_t n = write ? pwritev(fd, iov + i, (int)(cnt - i), off + (off_t)done)
                      : preadv(fd, iov + i, (int)(cnt - i), off + (off_t)done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return vubd_int(env, -errno);
    }
    if (n == 0) break; /* EOF */
    done += (uint64_t)n;
    for (size_t left = (size_t)n; left > 0;) {
      size_t take = left < iov[i].iov_len ? left : iov[i].iov_len;
      iov[i].iov_base = (char *)iov[i].iov_base + take;
      iov[i].iov_len -= take;
      left -= take;
      if (iov[i].iov_len == 0) i++;
    }
  }
  return vubd_num(env, (double)done);
}

static napi_value do_preadv(napi_env env, napi_callback_info info) { return rw(env, info, false); }
static napi_value do_pwritev(napi_env env, napi_callback_info info) { return rw(env, info, true); }

static napi_value do_fsync(napi_env env, napi_callback_info info) {
  VUBD_ARGS(2);
  int32_t fd;
  bool datasync = false;
  if (!vubd_arg_i32(env, argv[0], "fd", &fd)) return NULL;
  vubd_arg_bool(env, argv[1], &datasync);
  int r;
  do r = datasync ? fdatasync(fd) : fsync(fd);
  while (r < 0 && errno == EINTR);
  return vubd_int(env, r < 0 ? -errno : 0);
}

static napi_value do_fallocate(napi_env env, napi_callback_info info) {
  VUBD_ARGS(4);
  int32_t fd, mode;
  uint64_t off, len;
  if (!vubd_arg_i32(env, argv[0], "fd", &fd) || !vubd_arg_i32(env, argv[1], "mode", &mode) ||
      !vubd_arg_u64(env, argv[2], "offset", &off) || !vubd_arg_u64(env, argv[3], "length", &len))
    return NULL;
  int r;
  do r = fallocate(fd, mode, (off_t)off, (off_t)len);
  while (r < 0 && errno == EINTR);
  return vubd_int(env, r < 0 ? -errno : 0);
}

static napi_value block_device_size(napi_env env, napi_callback_info info) {
  VUBD_ARGS(1);
  int32_t fd;
  uint64_t size;
  if (!vubd_arg_i32(env, argv[0], "fd", &fd)) return NULL;
  if (ioctl(fd, BLKGETSIZE64, &size) < 0) return vubd_throw_errno(env, "ioctl(BLKGETSIZE64)", errno);
  return vubd_num(env, (double)size);
}

static napi_value thread_cpu_micros(napi_env env, napi_callback_info info) {
  struct timespec ts;
  if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) < 0) return vubd_throw_errno(env, "clock_gettime", errno);
  return vubd_num(env, (double)ts.tv_sec * 1e6 + (double)(ts.tv_nsec / 1000));
}

napi_status vubd_init_sync_io(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      VUBD_FN("preadv", do_preadv),
      VUBD_FN("pwritev", do_pwritev),
      VUBD_FN("fsync", do_fsync),
      VUBD_FN("fallocate", do_fallocate),
      VUBD_FN("blockDeviceSize", block_device_size),
      VUBD_FN("threadCpuMicros", thread_cpu_micros),
  };
  return napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}
