/* Module registration: context-aware, so the addon also loads in worker_threads. */
#include "util.h"

#include <stdlib.h>

static void free_data(napi_env env, void *data, void *hint) {
  vubd_data *d = data;
  if (d->poll_ctor) napi_delete_reference(env, d->poll_ctor);
  free(d);
}

NAPI_MODULE_INIT() {
  vubd_data *data = calloc(1, sizeof *data);
  if (data == NULL) {
    napi_throw_error(env, "ENOMEM", "vubd_native: out of memory");
    return NULL;
  }
  if (napi_set_instance_data(env, data, free_data, NULL) != napi_ok) {
    free(data);
    return NULL;
  }
  if (vubd_init_sockets(env, exports) != napi_ok || vubd_init_poll(env, exports, data) != napi_ok ||
      vubd_init_memory(env, exports) != napi_ok || vubd_init_eventfd(env, exports) != napi_ok ||
      vubd_init_uring(env, exports) != napi_ok || vubd_init_sync_io(env, exports) != napi_ok ||
      vubd_init_locks(env, exports) != napi_ok || vubd_init_accounts(env, exports) != napi_ok ||
      vubd_init_datagram(env, exports) != napi_ok || vubd_init_rbd(env, exports) != napi_ok ||
      vubd_init_stream_socket(env, exports) != napi_ok)
    return NULL;
  return exports;
}
