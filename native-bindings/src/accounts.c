/* User and group names to ids through NSS (getpwnam_r/getgrnam_r: /etc/passwd, systemd's
 * DynamicUser, LDAP...), for --socket-owner/--socket-group/--allow-uid/--allow-gid. */
#include "util.h"

#include <grp.h>
#include <pwd.h>
#include <stdlib.h>

#define NAME_MAX_LEN 256

static bool get_name(napi_env env, napi_value v, char *out) {
  size_t n;
  if (napi_get_value_string_utf8(env, v, NULL, 0, &n) != napi_ok) return vubd_type_error(env, "name", "a string");
  if (n == 0 || n >= NAME_MAX_LEN) return vubd_range_error(env, "name", "must be 1..255 bytes");
  napi_get_value_string_utf8(env, v, out, NAME_MAX_LEN, &n);
  return true;
}

/* {uid, gid} of a user name, or null when there is no such user. */
static napi_value lookup_user(napi_env env, napi_callback_info info) {
  VUBD_ARGS(1);
  char name[NAME_MAX_LEN];
  if (!get_name(env, argv[0], name)) return NULL;
  struct passwd pw, *res = NULL;
  char buf[16384];
  int err = getpwnam_r(name, &pw, buf, sizeof buf, &res);
  napi_value out;
  if (res == NULL) {
    if (err != 0 && err != ENOENT && err != ESRCH) return vubd_throw_errno(env, "getpwnam_r", err);
    napi_get_null(env, &out);
    return out;
  }
  if (napi_create_object(env, &out) != napi_ok ||
      napi_set_named_property(env, out, "uid", vubd_num(env, (double)pw.pw_uid)) != napi_ok ||
      napi_set_named_property(env, out, "gid", vubd_num(env, (double)pw.pw_gid)) != napi_ok)
    return NULL;
  return out;
}

/* gid of a group name, or null when there is no such group. */
static napi_value lookup_group(napi_env env, napi_callback_info info) {
  VUBD_ARGS(1);
  char name[NAME_MAX_LEN];
  if (!get_name(env, argv[0], name)) return NULL;
  struct group gr, *res = NULL;
  size_t size = 16384;
  /* a group with many members needs a larger buffer (ERANGE) */
  for (;;) {
    char *buf = malloc(size);
    if (buf == NULL) return vubd_throw_errno(env, "malloc", ENOMEM);
    int err = getgrnam_r(name, &gr, buf, size, &res);
    gid_t gid = res ? gr.gr_gid : 0;
    free(buf);
    if (err == ERANGE && size < (1u << 24)) {
      size *= 4;
      continue;
    }
    napi_value out;
    if (res == NULL) {
      if (err != 0 && err != ENOENT && err != ESRCH) return vubd_throw_errno(env, "getgrnam_r", err);
      napi_get_null(env, &out);
      return out;
    }
    return vubd_num(env, (double)gid);
  }
}

napi_status vubd_init_accounts(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      VUBD_FN("lookupUser", lookup_user),
      VUBD_FN("lookupGroup", lookup_group),
  };
  return napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}
