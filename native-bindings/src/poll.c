/*
 * Readiness: uv_poll_t handles on the Node event loop (PollHandle), and a blocking poll(2)
 * for worker threads (pollWait).
 *
 * PollHandle lifetime: the C struct is freed only when both the uv handle has finished closing
 * and the JS wrapper has been finalized. While started, the wrapper is held strongly so that it
 * cannot be collected out from under an active watcher. An async cleanup hook closes the handle
 * when the environment (e.g. a worker) shuts down; it also keeps napi_env alive until uv_close
 * has completed.
 */
#include "util.h"

#include <poll.h>
#include <stdlib.h>
#include <uv.h>

typedef struct {
  uv_poll_t handle;
  napi_env env;
  napi_ref cb_ref;   /* strong until closed */
  napi_ref self_ref; /* weak; strong while started */
  napi_async_context async_ctx;
  napi_async_cleanup_hook_handle cleanup;
  int events;
  bool started, closing, closed, finalized;
} vpoll;

static void poll_free_if_done(vpoll *p) {
  if (p->closed && p->finalized) free(p);
}

static void on_close(uv_handle_t *h) {
  vpoll *p = h->data;
  napi_env env = p->env;
  napi_handle_scope scope;
  bool scoped = napi_open_handle_scope(env, &scope) == napi_ok;
  if (p->cb_ref) napi_delete_reference(env, p->cb_ref);
  if (p->self_ref) napi_delete_reference(env, p->self_ref);
  if (p->async_ctx) napi_async_destroy(env, p->async_ctx);
  p->cb_ref = p->self_ref = NULL;
  p->async_ctx = NULL;
  if (scoped) napi_close_handle_scope(env, scope);
  napi_async_cleanup_hook_handle hook = p->cleanup;
  p->cleanup = NULL;
  p->closed = true;
  poll_free_if_done(p);
  if (hook) napi_remove_async_cleanup_hook(hook); /* last: may release the env */
}

static void poll_close(vpoll *p) {
  if (p->closing) return;
  p->closing = true;
  if (p->started && p->self_ref) napi_reference_unref(p->env, p->self_ref, NULL);
  p->started = false;
  uv_close((uv_handle_t *)&p->handle, on_close);
}

static void on_env_cleanup(napi_async_cleanup_hook_handle hook, void *arg) {
  vpoll *p = arg;
  if (!p->closing) poll_close(p); /* on_close removes the hook */
}

static void on_finalize(napi_env env, void *data, void *hint) {
  vpoll *p = data;
  p->finalized = true;
  if (!p->closing) {
    /* Weak ref is dead; don't touch it from the finalizer beyond scheduling the close. */
    poll_close(p);
    return;
  }
  poll_free_if_done(p);
}

static void on_poll(uv_poll_t *h, int status, int events) {
  vpoll *p = h->data;
  if (p->closing) return;
  napi_env env = p->env;
  napi_handle_scope scope;
  if (napi_open_handle_scope(env, &scope) != napi_ok) return;
  napi_value cb, recv = NULL, argv[2];
  napi_get_reference_value(env, p->cb_ref, &cb);
  if (p->self_ref) napi_get_reference_value(env, p->self_ref, &recv);
  if (recv == NULL) napi_get_global(env, &recv);
  argv[0] = vubd_int(env, status);
  argv[1] = vubd_int(env, events);
  if (napi_make_callback(env, p->async_ctx, recv, cb, 2, argv, NULL) == napi_pending_exception) {
    napi_value exc;
    if (napi_get_and_clear_last_exception(env, &exc) == napi_ok) napi_fatal_exception(env, exc);
  }
  napi_close_handle_scope(env, scope);
}

static vpoll *unwrap(napi_env env, napi_callback_info info, napi_value *argv, size_t n) {
  size_t argc = n;
  napi_value self;
  void *p = NULL;
  if (napi_get_cb_info(env, info, &argc, argv, &self, NULL) != napi_ok) return NULL;
  if (napi_unwrap(env, self, &p) != napi_ok || p == NULL) {
    napi_throw_type_error(env, "ERR_INVALID_THIS", "not a PollHandle");
    return NULL;
  }
  return p;
}

static bool do_start(napi_env env, vpoll *p, int events) {
  if (p->closing) {
    vubd_throw_errno_msg(env, EBADF, "PollHandle is closed");
    return false;
  }
  int r = uv_poll_start(&p->handle, events, on_poll);
  if (r < 0) {
    vubd_throw_errno(env, "uv_poll_start", -r);
    return false;
  }
  p->events = events;
  if (!p->started) napi_reference_ref(env, p->self_ref, NULL);
  p->started = true;
  return true;
}

static napi_value m_start(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int32_t events;
  vpoll *p = unwrap(env, info, argv, 1);
  if (p == NULL || !vubd_arg_i32(env, argv[0], "events", &events)) return NULL;
  do_start(env, p, events);
  return NULL;
}

static napi_value m_stop(napi_env env, napi_callback_info info) {
  vpoll *p = unwrap(env, info, NULL, 0);
  if (p == NULL || p->closing) return NULL;
  uv_poll_stop(&p->handle);
  if (p->started) napi_reference_unref(env, p->self_ref, NULL);
  p->started = false;
  return NULL;
}

static napi_value m_close(napi_env env, napi_callback_info info) {
  vpoll *p = unwrap(env, info, NULL, 0);
  if (p != NULL) poll_close(p);
  return NULL;
}

static napi_value m_ref(napi_env env, napi_callback_info info) {
  vpoll *p = unwrap(env, info, NULL, 0);
  if (p != NULL && !p->closing) uv_ref((uv_handle_t *)&p->handle);
  return NULL;
}

static napi_value m_unref(napi_env env, napi_callback_info info) {
  vpoll *p = unwrap(env, info, NULL, 0);
  if (p != NULL && !p->closing) uv_unref((uv_handle_t *)&p->handle);
  return NULL;
}

/* new PollHandle(fd, events, cb): internal constructor behind poll(). Starts immediately. */
static napi_value ctor(napi_env env, napi_callback_info info) {
  VUBD_ARGS(3);
  int32_t fd, events;
  napi_valuetype t;
  if (!vubd_arg_i32(env, argv[0], "fd", &fd) || !vubd_arg_i32(env, argv[1], "events", &events)) return NULL;
  if (napi_typeof(env, argv[2], &t) != napi_ok || t != napi_function) return vubd_type_error(env, "cb", "a function"), NULL;
  uv_loop_t *loop;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok) return NULL;

  vpoll *p = calloc(1, sizeof *p);
  if (p == NULL) return vubd_throw_errno(env, "poll", ENOMEM);
  int r = uv_poll_init(loop, &p->handle, fd); /* note: libuv makes fd non-blocking */
  if (r < 0) {
    free(p);
    return vubd_throw_errno(env, "uv_poll_init", -r);
  }
  p->handle.data = p;
  p->env = env;
  napi_value name;
  if (napi_wrap(env, self, p, on_finalize, NULL, NULL) != napi_ok) {
    /* Nothing references p from JS: close and free it once libuv is done. */
    p->finalized = true;
    poll_close(p);
    return NULL;
  }
  if (napi_create_reference(env, argv[2], 1, &p->cb_ref) != napi_ok ||
      napi_create_reference(env, self, 0, &p->self_ref) != napi_ok ||
      napi_create_string_utf8(env, "vubd:PollHandle", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_async_init(env, NULL, name, &p->async_ctx) != napi_ok ||
      napi_add_async_cleanup_hook(env, on_env_cleanup, p, &p->cleanup) != napi_ok) {
    poll_close(p);
    return NULL;
  }
  if (!do_start(env, p, events)) {
    poll_close(p);
    return NULL;
  }
  return self;
}

static napi_value poll_fn(napi_env env, napi_callback_info info) {
  VUBD_ARGS(3);
  vubd_data *data;
  napi_value cls, obj;
  if (napi_get_instance_data(env, (void **)&data) != napi_ok ||
      napi_get_reference_value(env, data->poll_ctor, &cls) != napi_ok)
    return NULL;
  napi_value args[3] = {argv[0], argv[1], argv[2]};
  if (napi_new_instance(env, cls, 3, args, &obj) != napi_ok) return NULL;
  return obj;
}

/* pollWait(fds, nfds, revents, timeoutMs[, events]): POLLIN on each fd, or events[i] when given
 * (a network client waits for POLLOUT while a send is pending); negative fds are ignored. */
#define POLLWAIT_MAX 1024
static napi_value poll_wait(napi_env env, napi_callback_info info) {
  VUBD_ARGS(5);
  void *fdv, *rv, *ev = NULL;
  size_t nf, nr, ne = 0;
  uint32_t nfds;
  int32_t timeout;
  if (!vubd_arg_typed(env, argv[0], "fds", napi_int32_array, "an Int32Array", &fdv, &nf) ||
      !vubd_arg_u32(env, argv[1], "nfds", &nfds) ||
      !vubd_arg_typed(env, argv[2], "revents", napi_int32_array, "an Int32Array", &rv, &nr) ||
      !vubd_arg_i32(env, argv[3], "timeoutMs", &timeout))
    return NULL;
  napi_valuetype et = napi_undefined;
  if (argc >= 5 && napi_typeof(env, argv[4], &et) != napi_ok) return NULL;
  if (et != napi_undefined && !vubd_arg_typed(env, argv[4], "events", napi_int32_array, "an Int32Array", &ev, &ne)) return NULL;
  if (ev != NULL && nfds > ne) return vubd_range_error(env, "nfds", "exceeds events length"), NULL;
  if (nfds > nf || nfds > nr || nfds > POLLWAIT_MAX)
    return vubd_range_error(env, "nfds", "exceeds fds/revents length or 1024"), NULL;
  const int32_t *fds = fdv;
  int32_t *revents = rv;
  struct pollfd pfd[POLLWAIT_MAX];
  for (uint32_t i = 0; i < nfds; i++) {
    pfd[i].fd = fds[i];
    pfd[i].events = ev != NULL ? (short)((const int32_t *)ev)[i] : POLLIN;
    pfd[i].revents = 0;
  }
  int n = poll(pfd, nfds, timeout < 0 ? -1 : timeout);
  if (n < 0 && errno != EINTR) return vubd_throw_errno(env, "poll", errno);
  if (n < 0) n = 0;
  for (uint32_t i = 0; i < nfds; i++) revents[i] = n > 0 ? pfd[i].revents : 0;
  return vubd_int(env, n);
}

napi_status vubd_init_poll(napi_env env, napi_value exports, vubd_data *data) {
  napi_property_descriptor methods[] = {
      VUBD_METHOD("start", m_start), VUBD_METHOD("stop", m_stop), VUBD_METHOD("close", m_close),
      VUBD_METHOD("ref", m_ref),     VUBD_METHOD("unref", m_unref),
  };
  napi_value cls;
  napi_status s = napi_define_class(env, "PollHandle", NAPI_AUTO_LENGTH, ctor, NULL,
                                    sizeof methods / sizeof methods[0], methods, &cls);
  if (s != napi_ok) return s;
  if ((s = napi_create_reference(env, cls, 1, &data->poll_ctor)) != napi_ok) return s;
  napi_property_descriptor props[] = {VUBD_FN("poll", poll_fn), VUBD_FN("pollWait", poll_wait)};
  return napi_define_properties(env, exports, 2, props);
}
