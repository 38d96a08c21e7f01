/* Open file description (OFD) byte-range locks: fcntl F_OFD_SETLK / F_OFD_GETLK. */
#include "util.h"

#include <fcntl.h>

/* type: F_RDLCK, F_WRLCK or F_UNLCK; start/len as in struct flock (len 0: to the end). */
static bool lock_args(napi_env env, napi_value *argv, int32_t *fd, struct flock *fl) {
  int32_t type;
  uint64_t start, len;
  if (!vubd_arg_i32(env, argv[0], "fd", fd) || !vubd_arg_i32(env, argv[1], "type", &type) ||
      !vubd_arg_u64(env, argv[2], "start", &start) || !vubd_arg_u64(env, argv[3], "len", &len))
    return false;
  if (type != F_RDLCK && type != F_WRLCK && type != F_UNLCK)
    return vubd_range_error(env, "type", "must be F_RDLCK, F_WRLCK or F_UNLCK");
  memset(fl, 0, sizeof *fl);
  fl->l_type = (short)type;
  fl->l_whence = SEEK_SET;
  fl->l_start = (off_t)start;
  fl->l_len = (off_t)len;
  fl->l_pid = 0; /* required by F_OFD_* */
  return true;
}

/* true: applied; false: a conflicting lock is held (EAGAIN/EACCES); other errors throw. */
static napi_value ofd_set_lock(napi_env env, napi_callback_info info) {
  VUBD_ARGS(4);
  int32_t fd;
  struct flock fl;
  if (!lock_args(env, argv, &fd, &fl)) return NULL;
  int r;
  do r = fcntl(fd, F_OFD_SETLK, &fl);
  while (r < 0 && errno == EINTR);
  if (r < 0) {
    if (errno == EAGAIN || errno == EACCES) return vubd_bool(env, false);
    return vubd_throw_errno(env, "fcntl(F_OFD_SETLK)", errno);
  }
  return vubd_bool(env, true);
}

/* null when the lock could be placed; otherwise the first conflicting lock {type, start, len, pid} (pid -1 for OFD locks). */
static napi_value ofd_get_lock(napi_env env, napi_callback_info info) {
  VUBD_ARGS(4);
  int32_t fd;
  struct flock fl;
  if (!lock_args(env, argv, &fd, &fl)) return NULL;
  if (fl.l_type == F_UNLCK) return vubd_throw_errno_msg(env, EINVAL, "ofdGetLock: type must be F_RDLCK or F_WRLCK");
  if (fcntl(fd, F_OFD_GETLK, &fl) < 0) return vubd_throw_errno(env, "fcntl(F_OFD_GETLK)", errno);
  napi_value out;
  if (fl.l_type == F_UNLCK) {
    napi_get_null(env, &out);
    return out;
  }
  if (napi_create_object(env, &out) != napi_ok) return NULL;
  napi_set_named_property(env, out, "type", vubd_int(env, fl.l_type));
  napi_set_named_property(env, out, "start", vubd_num(env, (double)fl.l_start));
  napi_set_named_property(env, out, "len", vubd_num(env, (double)fl.l_len));
  napi_set_named_property(env, out, "pid", vubd_int(env, fl.l_pid));
  return out;
}

napi_status vubd_init_locks(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      VUBD_FN("ofdSetLock", ofd_set_lock),
      VUBD_FN("ofdGetLock", ofd_get_lock),
      {"F_RDLCK", NULL, NULL, NULL, NULL, vubd_int(env, F_RDLCK), napi_enumerable, NULL},
      {"F_WRLCK", NULL, NULL, NULL, NULL, vubd_int(env, F_WRLCK), napi_enumerable, NULL},
      {"F_UNLCK", NULL, NULL, NULL, NULL, vubd_int(env, F_UNLCK), napi_enumerable, NULL},
  };
  return napi_define_properties(env, exports, 5, props);
}
