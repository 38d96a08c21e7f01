/*
 * Non-blocking stream sockets for network block clients (NBD): connect over TCP or a unix path,
 * and scatter/gather send/recv straight from/into iovecs (guest memory). Transfers return bytes
 * or -errno (including -EAGAIN); they never throw for I/O errors, so the data path has no
 * exceptions. Setup errors (bad address, socket()) are thrown.
 */
#include "util.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#define STREAM_IOV_MAX 1026 /* a request header, a guest iov of up to 1024 segments, a trailer */

static napi_value connect_result(napi_env env, int fd, bool pending) {
  napi_value obj, jfd, jp;
  if (napi_create_object(env, &obj) != napi_ok || napi_create_int32(env, fd, &jfd) != napi_ok ||
      napi_get_boolean(env, pending, &jp) != napi_ok)
    return NULL;
  napi_set_named_property(env, obj, "fd", jfd);
  napi_set_named_property(env, obj, "pending", jp);
  return obj;
}

/* streamConnect(kind 'inet'|'unix', address, port): {fd, pending}; pending = EINPROGRESS (wait for POLLOUT, then socketError). */
static napi_value stream_connect(napi_env env, napi_callback_info info) {
  VUBD_ARGS(3);
  char kind[8], addr[256];
  size_t klen, alen;
  int32_t port = 0;
  if (napi_get_value_string_utf8(env, argv[0], kind, sizeof kind, &klen) != napi_ok) return vubd_type_error(env, "kind", "a string"), NULL;
  if (napi_get_value_string_utf8(env, argv[1], addr, sizeof addr, &alen) != napi_ok) return vubd_type_error(env, "address", "a string"), NULL;
  struct sockaddr_storage ss;
  socklen_t sl;
  memset(&ss, 0, sizeof ss);
  int family;
  if (strcmp(kind, "unix") == 0) {
    struct sockaddr_un *un = (struct sockaddr_un *)&ss;
    if (alen == 0 || alen >= sizeof un->sun_path) return vubd_throw_errno_msg(env, ENAMETOOLONG, "unix socket path is empty or too long");
    un->sun_family = AF_UNIX;
    memcpy(un->sun_path, addr, alen + 1);
    sl = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + alen + 1);
    family = AF_UNIX;
  } else if (strcmp(kind, "inet") == 0) {
    if (!vubd_arg_i32(env, argv[2], "port", &port)) return NULL;
    if (port <= 0 || port > 65535) return vubd_range_error(env, "port", "must be 1..65535"), NULL;
    struct sockaddr_in *in4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&ss;
    if (inet_pton(AF_INET, addr, &in4->sin_addr) == 1) {
      in4->sin_family = AF_INET;
      in4->sin_port = htons((uint16_t)port);
      sl = sizeof *in4;
      family = AF_INET;
    } else if (inet_pton(AF_INET6, addr, &in6->sin6_addr) == 1) {
      in6->sin6_family = AF_INET6;
      in6->sin6_port = htons((uint16_t)port);
      sl = sizeof *in6;
      family = AF_INET6;
    } else {
      return vubd_throw_errno_msg(env, EINVAL, "not a numeric IPv4/IPv6 address (resolve names first)");
    }
  } else {
    return vubd_type_error(env, "kind", "'inet' or 'unix'"), NULL;
  }
  int fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return vubd_throw_errno(env, "socket", errno);
  if (family != AF_UNIX) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); /* requests are small and latency-bound */
  }
  if (connect(fd, (struct sockaddr *)&ss, sl) == 0) return connect_result(env, fd, false);
  int err = errno;
  if (err == EINPROGRESS) return connect_result(env, fd, true); /* a unix socket with a full backlog fails with EAGAIN */
  close(fd);
  return vubd_throw_errno(env, "connect", err);
}

/* socketError(fd): SO_ERROR (0 when a pending connect succeeded). */
static napi_value socket_error(napi_env env, napi_callback_info info) {
  VUBD_ARGS(1);
  int32_t fd;
  if (!vubd_arg_i32(env, argv[0], "fd", &fd)) return NULL;
  int err = 0;
  socklen_t len = sizeof err;
  if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
  return vubd_int(env, err);
}

/* (fd, iov Float64Array [addr, len, ...], iovCount) -> iovec array; false after a throw */
static bool get_stream_iov(napi_env env, napi_value *argv, int32_t *fd, struct iovec *out, int *count) {
  void *data;
  size_t n;
  int32_t cnt;
  if (!vubd_arg_i32(env, argv[0], "fd", fd) ||
      !vubd_arg_typed(env, argv[1], "iov", napi_float64_array, "a Float64Array", &data, &n) ||
      !vubd_arg_i32(env, argv[2], "iovCount", &cnt))
    return false;
  if (cnt < 0 || cnt > STREAM_IOV_MAX || (size_t)cnt > n / 2) return vubd_range_error(env, "iovCount", "exceeds the iov or 1026"), false;
  const double *v = data;
  for (int32_t i = 0; i < cnt; i++) {
    out[i].iov_base = (void *)(uintptr_t)v[2 * i];
    out[i].iov_len = (size_t)v[2 * i + 1];
  }
  *count = cnt;
  return true;
}

/* sendv(fd, iov, iovCount): bytes sent (maybe fewer than asked) or -errno (-EAGAIN: nothing fits now). MSG_NOSIGNAL. */
static napi_value sendv(napi_env env, napi_callback_info info) {
  VUBD_ARGS(3);
  int32_t fd;
  int cnt;
  struct iovec iov[STREAM_IOV_MAX];
  if (!get_stream_iov(env, argv, &fd, iov, &cnt)) return NULL;
  struct msghdr mh;
  memset(&mh, 0, sizeof mh);
  mh.msg_iov = iov;
  mh.msg_iovlen = (size_t)cnt;
  ssize_t r;
  do r = sendmsg(fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
  while (r < 0 && errno == EINTR);
  return vubd_int(env, r < 0 ? -errno : (int)r);
}

/* recvv(fd, iov, iovCount): bytes received (0 = the peer closed) or -errno (-EAGAIN: nothing yet). */
static napi_value recvv(napi_env env, napi_callback_info info) {
  VUBD_ARGS(3);
  int32_t fd;
  int cnt;
  struct iovec iov[STREAM_IOV_MAX];
  if (!get_stream_iov(env, argv, &fd, iov, &cnt)) return NULL;
  struct msghdr mh;
  memset(&mh, 0, sizeof mh);
  mh.msg_iov = iov;
  mh.msg_iovlen = (size_t)cnt;
  ssize_t r;
  do r = recvmsg(fd, &mh, MSG_DONTWAIT);
  while (r < 0 && errno == EINTR);
  return vubd_int(env, r < 0 ? -errno : (int)r);
}

napi_status vubd_init_stream_socket(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      VUBD_FN("streamConnect", stream_connect),
      VUBD_FN("socketError", socket_error),
      VUBD_FN("sendv", sendv),
      VUBD_FN("recvv", recvv),
  };
  return napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}
