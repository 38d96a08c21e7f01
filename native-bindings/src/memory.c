/* Shared mappings of guest memory as external ArrayBuffers (unmapped by the GC finalizer). */
#include "util.h"

#include <sys/mman.h>

#define MAX_MAP_LEN (4ULL << 30) /* Node 20 caps external ArrayBuffers at 4 GiB */

static void unmap_finalizer(napi_env env, void *data, void *hint) {
  munmap(data, (size_t)(uintptr_t)hint);
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
  void *p = mmap(NULL, len, PROT_READ | (writable ? PROT_WRITE : 0), MAP_SHARED, fd, (off_t)off_d);
  if (p == MAP_FAILED) return vubd_throw_errno(env, "mmap", errno);
  napi_value ab;
  /* On failure Node has already run the finalizer (munmap) or never took ownership with an
   * exception pending; either way do not unmap here (that could hit a reused range). */
  if (napi_create_external_arraybuffer(env, p, len, unmap_finalizer, (void *)(uintptr_t)len, &ab) != napi_ok)
    return NULL;
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
  napi_property_descriptor props[] = {VUBD_FN("mmap", do_mmap), VUBD_FN("addressOf", address_of)};
  return napi_define_properties(env, exports, 2, props);
}
