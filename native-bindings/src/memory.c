/* Guest memory as ArrayBuffers: views of the process-wide mappings in mappings.c.
 *
 * The main thread maps a region chunk once (mapShared) and passes its id to the workers; each
 * worker turns the id into a view (viewMapping): an external ArrayBuffer over the same pages that
 * holds one reference. unmap(view) drops that reference now and detaches the view: worker threads
 * never return to their event loop, so they never run GC finalizers. A view the GC collects drops
 * its reference in the finalizer (on the main thread, tests). The pages go with the last reference.
 * mmap() is a mapping whose only reference is the view it returns. */
#include "util.h"

#include <pthread.h>
#include "mappings.h"

#include <stdlib.h>
#include <stdio.h>

#define MAX_MAP_LEN (4ULL << 30) /* Node 20 caps external ArrayBuffers at 4 GiB */

/* unowned_buffer.cc: an ArrayBuffer over data that V8 neither frees nor counts as its memory */
napi_status vubd_unowned_arraybuffer(napi_env env, void *data, size_t length, napi_value *result);

/* The reference one view holds; attached to the ArrayBuffer with napi_wrap, so unmap() finds it. */
typedef struct view_rec {
  vubd_mapping *m;
  napi_env env;
  /* strong until unmap(): the env's cleanup hook must find every view still attached when the
   * thread ends (a weak one is already empty then, and V8's teardown crashes on the buffer) */
  napi_ref ref;
  struct view_rec *prev, *next;
  bool linked;
  /* its mapping reference is dropped already (the env's cleanup hook detached it) */
  bool released;
} view_rec;

/* Every live view of every env (thread). A view still attached when its isolate is torn down
 * crashes V8's ArrayBufferSweeper (seen with a worker that exits without unmapping), so the env's
 * cleanup hook detaches what is left before that. */
static view_rec *views_head;
static pthread_mutex_t views_lock = PTHREAD_MUTEX_INITIALIZER;

static void link_view(view_rec *v) {
  pthread_mutex_lock(&views_lock);
  v->prev = NULL;
  v->next = views_head;
  if (views_head) views_head->prev = v;
  views_head = v;
  v->linked = true;
  pthread_mutex_unlock(&views_lock);
}

static void unlink_view(view_rec *v) {
  pthread_mutex_lock(&views_lock);
  if (v->linked) {
    if (v->prev) v->prev->next = v->next;
    else views_head = v->next;
    if (v->next) v->next->prev = v->prev;
    v->linked = false;
  }
  pthread_mutex_unlock(&views_lock);
}

/* Drops a view that is no longer reachable through its wrap: its ref, its mapping reference, itself. */
static void drop_view(napi_env env, view_rec *v) {
  unlink_view(v);
  if (v->ref != NULL) napi_delete_reference(env, v->ref);
  if (!v->released) vubd_mapping_put(v->m);
  free(v);
}

static void view_finalizer(napi_env env, void *data, void *hint) {
  drop_view(env, data);
}

static void detach_env_views(void *arg) {
  napi_env env = arg;
  for (;;) {
    view_rec *v = NULL;
    pthread_mutex_lock(&views_lock);
    for (view_rec *p = views_head; p != NULL; p = p->next)
      if (p->env == env) {
        v = p;
        break;
      }
    pthread_mutex_unlock(&views_lock);
    if (v == NULL) return;
    unlink_view(v);
    napi_handle_scope scope;
    bool scoped = napi_open_handle_scope(env, &scope) == napi_ok;
    napi_value ab = NULL;
    /* No JS can run any more (napi_remove_wrap refuses): detach, and leave freeing v to the wrap's finalizer. */
    if (v->ref != NULL && napi_get_reference_value(env, v->ref, &ab) == napi_ok && ab != NULL) {
      napi_detach_arraybuffer(env, ab);
      if (!v->released) vubd_mapping_put(v->m);
      v->released = true;
    }
    /* else: the wrap's finalizer owns v and frees it (it is unlinked already) */
    if (scoped) napi_close_handle_scope(env, scope);
  }
}

/* A new view of m, which already counts the reference this view will hold (dropped on failure). */
static napi_value make_view(napi_env env, vubd_mapping *m) {
  view_rec *v = malloc(sizeof *v);
  if (v == NULL) {
    vubd_mapping_put(m);
    return vubd_throw_errno(env, "mmap", ENOMEM);
  }
  v->m = m;
  v->env = env;
  v->ref = NULL;
  v->linked = false;
  v->released = false;
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
  if (napi_create_reference(env, ab, 1, &v->ref) == napi_ok) link_view(v);
  else v->ref = NULL;
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
  drop_view(env, v);
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
  napi_add_env_cleanup_hook(env, detach_env_views, env);
  napi_property_descriptor props[] = {
      VUBD_FN("mmap", do_mmap),           VUBD_FN("mapShared", map_shared),
      VUBD_FN("viewMapping", view_mapping), VUBD_FN("releaseMapping", release_mapping),
      VUBD_FN("retainMapping", retain_mapping),
      VUBD_FN("unmap", do_unmap),         VUBD_FN("addressOf", address_of),
      VUBD_FN("sigbusRescues", sigbus_rescues), VUBD_FN("liveMappings", live_mappings)};
  return napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}
