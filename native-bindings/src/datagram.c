/* Unix datagram sockets: sd_notify-style messages to $NOTIFY_SOCKET (a path, or "@name" for the
 * abstract namespace), and a bound receiver for tests. */
#include "util.h"

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

/* "@name" is abstract: sun_path[0] = 0 and the length counts no trailing NUL. */
static bool notify_addr(napi_env env, napi_value v, struct sockaddr_un *sa, socklen_t *len) {
  size_t n;
  if (napi_get_value_string_utf8(env, v, NULL, 0, &n) != napi_ok) return vubd_type_error(env, "path", "a string");
  if (n == 0) {
    vubd_throw_errno_msg(env, EINVAL, "datagram socket path is empty");
    return false;
  }
  if (n >= sizeof sa->sun_path) {
    vubd_throw_errno_msg(env, ENAMETOOLONG, "unix socket path must be 1..107 bytes");
    return false;
  }
  memset(sa, 0, sizeof *sa);
  sa->sun_family = AF_UNIX;
  napi_get_value_string_utf8(env, v, sa->sun_path, sizeof sa->sun_path, &n);
  if (sa->sun_path[0] == '@') {
    if (n < 2) {
      vubd_throw_errno_msg(env, EINVAL, "abstract socket name is empty");
      return false;
    }
    sa->sun_path[0] = '\0';
    *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n);
  } else {
    *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + 1);
  }
  return true;
}

/* sendDatagram(path, buf): one message on a fresh socket, as sd_notify does. */
static napi_value send_datagram(napi_env env, napi_callback_info info) {
  VUBD_ARGS(2);
  struct sockaddr_un sa;
  socklen_t len;
  void *data;
  size_t n;
  if (!notify_addr(env, argv[0], &sa, &len) ||
      !vubd_arg_typed(env, argv[1], "buf", napi_uint8_array, "a Uint8Array", &data, &n))
    return NULL;
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return vubd_throw_errno(env, "socket", errno);
  ssize_t r;
  do r = sendto(fd, data, n, MSG_NOSIGNAL, (struct sockaddr *)&sa, len);
  while (r < 0 && errno == EINTR);
  int err = errno;
  close(fd);
  if (r < 0) return vubd_throw_errno(env, "sendto", err);
  return vubd_num(env, (double)r);
}

/* bindDatagram(path): a non-blocking bound datagram socket (read it with recvMsg). */
static napi_value bind_datagram(napi_env env, napi_callback_info info) {
  VUBD_ARGS(1);
  struct sockaddr_un sa;
  socklen_t len;
  if (!notify_addr(env, argv[0], &sa, &len)) return NULL;
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return vubd_throw_errno(env, "socket", errno);
  if (bind(fd, (struct sockaddr *)&sa, len) < 0) {
    int err = errno;
    close(fd);
    return vubd_throw_errno(env, "bind", err);
  }
  return vubd_int(env, fd);
}

napi_status vubd_init_datagram(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      VUBD_FN("sendDatagram", send_datagram),
      VUBD_FN("bindDatagram", bind_datagram),
  };
  return napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}
