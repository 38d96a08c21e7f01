/* Guest memory as ArrayBuffers: views of the process-wide mappings in mappings.c.
 *
 * The main thread maps a region chunk once (mapShared) and passes its id to the workers; each
 * worker turns the id into a view (viewMapping): an external ArrayBuffer over the same pages that
 * holds one reference. unmap(view) drops that reference now and detaches the view: worker threads
 * never return to their event loop, so they never run GC finalizers. A view the GC collects drops
 * its reference in the finalizer (on the main thread, tests). The pages go with the last reference.
 * mmap() is a mapping whose only reference is the view it returns. */
#include "util.h"
#include "mappings.h"

#include <stdlib.h>

#define MAX_MAP_LEN (4ULL << 30) /* Node 20 caps external ArrayBuffers at 4 GiB */

/* unowned_buffer.cc: an ArrayBuffer over data that V8 neither frees nor counts as its memory */
napi_status vubd_unowned_arraybuffer(napi_env env, void *data, size_t length, napi_value *result);

/* The reference one view holds; attached to the ArrayBuffer with napi_wrap, so unmap() finds it. */
typedef struct {
  vubd_mapping *m;
} view_rec;

static void view_finalizer(napi_env env, void *data, void *hint) {
  view_rec *v = data;
  vubd_mapping_put(v->m);
  free(v);
}

/* A new view of m, which already counts the reference this view will hold (dropped on failure). */
static napi_value make_view(napi_env env, vubd_mapping *m) {
  view_rec *v = malloc(sizeof *v);
  if (v == NULL) {
    vubd_mapping_put(m);
    return vubd_throw_errno(env, "mmap", ENOMEM);
  }
  v->m = m;
  napi_value ab;
  /* The buffer itself owns nothing: the wrap's finalizer holds the reference. */
  if (vubd_unowned_arraybuffer(env, vubd_mapping_addr(m), vubd_mapping_len(m), &ab) != napi_ok) {
    vubd_mapping_put(m);
    free(v);
    return vubd_throw_errno(env, "mmap", ENOMEM);
  }
  if (napi_wrap(env, ab, v, view_finalizer, NULL, NULL) != napi_ok) {
    napi_detach_arraybuffer(env, ab); /* unreachable anyway; never let it point at unmapped pages */
    vubd_mapping_put(m);
    free(v);
    return vubd_throw_errno(env, "mmap", ENOMEM);
  }
  return ab;
}

/* Parses (fd, length, offset, writable) and maps; NULL with an exception pending on failure. */
static vubd_mapping *map_args(napi_env env, napi_callback_info info, bool owner, double *id) {
  VUBD_ARGS(4);
  int32_t fd;
  double len_d, off_d;
  bool writable;
  if (!vubd_arg_i32(env, argv[0], "fd", &fd)) return NULL;
  if (napi_get_value_double(env, argv[1], &len_d) != napi_ok) return vubd_type_error(env, "length", "a number"), NULL;
  if (!(len_d > 0 && len_d <= (double)MAX_MAP_LEN) || (double)(uint64_t)len_d != len_d)
    return vubd_throw_errno_msg(env, ERANGE,
                                "mmap: length must be an integer in (0, 4 GiB]; map regions over 4 GiB in chunks"),
           NULL;
  if (napi_get_value_double(env, argv[2], &off_d) != napi_ok) return vubd_type_error(env, "offset", "a number"), NULL;
  vubd_arg_bool(env, argv[3], &writable);
  /* Negative, fractional or unaligned offsets: EINVAL, as the kernel would report. */
  if (!(off_d >= 0 && off_d <= VUBD_MAX_SAFE) || (double)(int64_t)off_d != off_d)
    return vubd_throw_errno(env, "mmap", EINVAL), NULL;
  vubd_mapping *m = vubd_mapping_create(fd, (size_t)len_d, (long long)off_d, writable, owner, id);
  if (m == NULL) vubd_throw_errno(env, "mmap", errno);
  return m;
}

static napi_value do_mmap(napi_env env, napi_callback_info info) {
  double id;
  vubd_mapping *m = map_args(env, info, false, &id);
  return m != NULL ? make_view(env, m) : NULL;
}

static napi_value map_shared(napi_env env, napi_callback_info info) {
  double id;
  return map_args(env, info, true, &id) != NULL ? vubd_num(env, id) : NULL;
}

static napi_value view_mapping(napi_env env, napi_callback_info info) {
  VUBD_ARGS(1);
  double id;
  if (napi_get_value_double(env, argv[0], &id) != napi_ok) return vubd_type_error(env, "id", "a number"), NULL;
  vubd_mapping *m = vubd_mapping_get(id);
  if (m == NULL) return vubd_throw_errno_msg(env, ENOENT, "viewMapping: no such mapping (released already?)");
  return make_view(env, m);
}

static napi_value retain_mapping(napi_env env, napi_callback_info info) {
  VUBD_ARGS(1);
  double id;
  if (napi_get_value_double(env, argv[0], &id) != napi_ok) return vubd_type_error(env, "id", "a number"), NULL;
  napi_value result;
  napi_get_boolean(env, vubd_mapping_retain_owner(id), &result);
  return result;
}

static napi_value release_mapping(napi_env env, napi_callback_info info) {
  VUBD_ARGS(1);
  double id;
  if (napi_get_value_double(env, argv[0], &id) != napi_ok) return vubd_type_error(env, "id", "a number"), NULL;
  napi_value result;
  napi_get_boolean(env, vubd_mapping_release_owner(id), &result);
  return result;
}

/* Drops a view's reference now and detaches it (views see length 0). False if not ours or done. */
static napi_value do_unmap(napi_env env, napi_callback_info info) {
  VUBD_ARGS(1);
  bool is = false;
  if (napi_is_arraybuffer(env, argv[0], &is) != napi_ok || !is) return vubd_type_error(env, "buf", "an ArrayBuffer"), NULL;
  void *data = NULL;
  view_rec *v = NULL;
  napi_value result;
  /* Removing the wrap also cancels its finalizer: exactly one of the two drops the reference. */
  if (napi_remove_wrap(env, argv[0], &data) != napi_ok || data == NULL) {
    napi_get_boolean(env, false, &result);
    return result;
  }
  v = data;
  napi_detach_arraybuffer(env, argv[0]); /* no JS access after this */
  vubd_mapping_put(v->m);
  free(v);
  napi_get_boolean(env, true, &result);
  return result;
}

static napi_value live_mappings(napi_env env, napi_callback_info info) {
  return vubd_num(env, (double)vubd_mappings_live());
}

static napi_value sigbus_rescues(napi_env env, napi_callback_info info) {
  return vubd_num(env, (double)vubd_sigbus_rescues());
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
  vubd_mappings_init();
  napi_property_descriptor props[] = {
      VUBD_FN("mmap", do_mmap),           VUBD_FN("mapShared", map_shared),
      VUBD_FN("viewMapping", view_mapping), VUBD_FN("releaseMapping", release_mapping),
      VUBD_FN("retainMapping", retain_mapping),
      VUBD_FN("unmap", do_unmap),         VUBD_FN("addressOf", address_of),
      VUBD_FN("sigbusRescues", sigbus_rescues), VUBD_FN("liveMappings", live_mappings)};
  return napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}
