/* Shared helpers for the vubd native addon: argument parsing and errno exceptions. */
#ifndef VUBD_UTIL_H
#define VUBD_UTIL_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#define NAPI_VERSION 8
#include <node_api.h>

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

/* Per-environment state (one per main thread / worker). */
typedef struct {
  napi_ref poll_ctor;
} vubd_data;

/* Largest integer a JS number holds exactly. */
#define VUBD_MAX_SAFE 9007199254740992.0

/* Throws Error("<what>: <strerror>") with .errno (number), .code ('EBADF', ...), .syscall. */
static inline napi_value vubd_throw_errno(napi_env env, const char *what, int err) {
  char text[64], msg[256];
  const char *desc = strerror_r(err, text, sizeof text);
  const char *name = strerrorname_np(err);
  char fallback[24];
  if (name == NULL) {
    snprintf(fallback, sizeof fallback, "E%d", err);
    name = fallback;
  }
  snprintf(msg, sizeof msg, "%s: %s", what, desc);
  napi_value jmsg, jcode, jerr, jnum, jsys;
  if (napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &jmsg) != napi_ok ||
      napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &jcode) != napi_ok ||
      napi_create_error(env, jcode, jmsg, &jerr) != napi_ok)
    return NULL;
  if (napi_create_int32(env, err, &jnum) == napi_ok) napi_set_named_property(env, jerr, "errno", jnum);
  if (napi_create_string_utf8(env, what, NAPI_AUTO_LENGTH, &jsys) == napi_ok)
    napi_set_named_property(env, jerr, "syscall", jsys);
  napi_throw(env, jerr);
  return NULL;
}

/* Throws Error(msg) with .errno/.code of err, for argument-range errors that mirror an errno. */
static inline napi_value vubd_throw_errno_msg(napi_env env, int err, const char *msg) {
  napi_value jmsg, jcode, jerr, jnum;
  const char *name = strerrorname_np(err);
  if (napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &jmsg) != napi_ok ||
      napi_create_string_utf8(env, name ? name : "EUNKNOWN", NAPI_AUTO_LENGTH, &jcode) != napi_ok ||
      napi_create_error(env, jcode, jmsg, &jerr) != napi_ok)
    return NULL;
  if (napi_create_int32(env, err, &jnum) == napi_ok) napi_set_named_property(env, jerr, "errno", jnum);
  napi_throw(env, jerr);
  return NULL;
}

static inline bool vubd_type_error(napi_env env, const char *name, const char *expected) {
  char msg[128];
  snprintf(msg, sizeof msg, "argument '%s' must be %s", name, expected);
  napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", msg);
  return false;
}

static inline bool vubd_range_error(napi_env env, const char *name, const char *what) {
  char msg[160];
  snprintf(msg, sizeof msg, "argument '%s' %s", name, what);
  napi_throw_range_error(env, "ERR_OUT_OF_RANGE", msg);
  return false;
}

static inline bool vubd_arg_i32(napi_env env, napi_value v, const char *name, int32_t *out) {
  if (napi_get_value_int32(env, v, out) != napi_ok) return vubd_type_error(env, name, "a number");
  return true;
}

static inline bool vubd_arg_u32(napi_env env, napi_value v, const char *name, uint32_t *out) {
  int32_t i;
  if (!vubd_arg_i32(env, v, name, &i)) return false;
  if (i < 0) return vubd_range_error(env, name, "must be >= 0");
  *out = (uint32_t)i;
  return true;
}

/* Non-negative integral JS number (<= 2^53) as uint64. */
static inline bool vubd_arg_u64(napi_env env, napi_value v, const char *name, uint64_t *out) {
  double d;
  if (napi_get_value_double(env, v, &d) != napi_ok) return vubd_type_error(env, name, "a number");
  if (!(d >= 0 && d <= VUBD_MAX_SAFE) || (double)(uint64_t)d != d)
    return vubd_range_error(env, name, "must be a non-negative integer");
  *out = (uint64_t)d;
  return true;
}

static inline bool vubd_arg_bool(napi_env env, napi_value v, bool *out) {
  napi_value b;
  return napi_coerce_to_bool(env, v, &b) == napi_ok && napi_get_value_bool(env, b, out) == napi_ok;
}

/* Typed array of the given element type: data (already adjusted by byteOffset) and element count. */
static inline bool vubd_arg_typed(napi_env env, napi_value v, const char *name, napi_typedarray_type want,
                                  const char *expected, void **data, size_t *len) {
  bool is;
  napi_typedarray_type type;
  if (napi_is_typedarray(env, v, &is) != napi_ok || !is) return vubd_type_error(env, name, expected);
  if (napi_get_typedarray_info(env, v, &type, len, data, NULL, NULL) != napi_ok || type != want)
    return vubd_type_error(env, name, expected);
  return true;
}

#define VUBD_ARGS(n)                                                             \
  size_t argc = (n);                                                             \
  napi_value argv[(n) > 0 ? (n) : 1];                                            \
  napi_value self;                                                               \
  if (napi_get_cb_info(env, info, &argc, argv, &self, NULL) != napi_ok) return NULL; \
  (void)self

static inline napi_value vubd_num(napi_env env, double d) {
  napi_value v;
  napi_create_double(env, d, &v);
  return v;
}

static inline napi_value vubd_int(napi_env env, int32_t i) {
  napi_value v;
  napi_create_int32(env, i, &v);
  return v;
}

static inline napi_value vubd_bool(napi_env env, bool b) {
  napi_value v;
  napi_get_boolean(env, b, &v);
  return v;
}

static inline napi_value vubd_undefined(napi_env env) {
  napi_value v;
  napi_get_undefined(env, &v);
  return v;
}

/* Exported function (enumerable, like a normal module export). */
#define VUBD_FN(name, fn) \
  { name, NULL, fn, NULL, NULL, NULL, napi_default_jsproperty, NULL }
/* Class prototype method (non-enumerable, like a JS class method). */
#define VUBD_METHOD(name, fn) \
  { name, NULL, fn, NULL, NULL, NULL, napi_default_method, NULL }

/* Registration entry points, one per concept file. */
napi_status vubd_init_sockets(napi_env env, napi_value exports);
napi_status vubd_init_poll(napi_env env, napi_value exports, vubd_data *data);
napi_status vubd_init_memory(napi_env env, napi_value exports);
napi_status vubd_init_eventfd(napi_env env, napi_value exports);
napi_status vubd_init_uring(napi_env env, napi_value exports);
napi_status vubd_init_sync_io(napi_env env, napi_value exports);
napi_status vubd_init_locks(napi_env env, napi_value exports);
napi_status vubd_init_accounts(napi_env env, napi_value exports);
napi_status vubd_init_datagram(napi_env env, napi_value exports);
napi_status vubd_init_rbd(napi_env env, napi_value exports);
napi_status vubd_init_stream_socket(napi_env env, napi_value exports);

#endif
