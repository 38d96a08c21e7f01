/* Unix domain sockets with SCM_RIGHTS fd passing (vhost-user control channel). */
#include "util.h"

#include <fcntl.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_FDS 64

static bool get_sockaddr(napi_env env, napi_value v, struct sockaddr_un *sa, socklen_t *len) {
  size_t n;
  if (napi_get_value_string_utf8(env, v, NULL, 0, &n) != napi_ok) return vubd_type_error(env, "path", "a string");
  if (n == 0 || n >= sizeof sa->sun_path) {
    vubd_throw_errno_msg(env, ENAMETOOLONG, "unix socket path must be 1..107 bytes");
    return false;
  }
  memset(sa, 0, sizeof *sa);
  sa->sun_family = AF_UNIX;
  napi_get_value_string_utf8(env, v, sa->sun_path, sizeof sa->sun_path, &n);
  *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + 1);
  return true;
}

static napi_value listen_unix(napi_env env, napi_callback_info info) {
  VUBD_ARGS(2);
  struct sockaddr_un sa;
  socklen_t len;
  int32_t backlog;
  if (!get_sockaddr(env, argv[0], &sa, &len) || !vubd_arg_i32(env, argv[1], "backlog", &backlog)) return NULL;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return vubd_throw_errno(env, "socket", errno);
  if (bind(fd, (struct sockaddr *)&sa, len) < 0) {
    int err = errno;
    close(fd);
    return vubd_throw_errno(env, "bind", err);
  }
  if (listen(fd, backlog) < 0) {
    int err = errno;
    close(fd);
    return vubd_throw_errno(env, "listen", err);
  }
  return vubd_int(env, fd);
}

static napi_value connect_unix(napi_env env, napi_callback_info info) {
  VUBD_ARGS(1);
  struct sockaddr_un sa;
  socklen_t len;
  if (!get_sockaddr(env, argv[0], &sa, &len)) return NULL;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return vubd_throw_errno(env, "socket", errno);
  int r;
  do r = connect(fd, (struct sockaddr *)&sa, len);
  while (r < 0 && errno == EINTR);
  if (r < 0 && errno != EISCONN) { /* EISCONN: an interrupted connect completed meanwhile */
    int err = errno;
    close(fd);
    return vubd_throw_errno(env, "connect", err);
  }
  return vubd_int(env, fd);
}

static napi_value socket_pair(napi_env env, napi_callback_info info) {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) return vubd_throw_errno(env, "socketpair", errno);
  napi_value arr;
  if (napi_create_array_with_length(env, 2, &arr) != napi_ok ||
      napi_set_element(env, arr, 0, vubd_int(env, sv[0])) != napi_ok ||
      napi_set_element(env, arr, 1, vubd_int(env, sv[1])) != napi_ok) {
    close(sv[0]);
    close(sv[1]);
    return NULL;
  }
  return arr;
}

static napi_value accept_conn(napi_env env, napi_callback_info info) {
  VUBD_ARGS(1);
  int32_t lfd;
  if (!vubd_arg_i32(env, argv[0], "listenFd", &lfd)) return NULL;
  for (;;) {
    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd >= 0) return vubd_int(env, fd);
    if (errno == EINTR) continue;
    /* ECONNABORTED: the pending connection went away before we took it; nothing to accept. */
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ECONNABORTED) return vubd_int(env, -1);
    return vubd_throw_errno(env, "accept4", errno);
  }
}

/* Validates buf/offset/length and returns the byte range. */
static bool get_span(napi_env env, napi_value *argv, uint8_t **base, size_t *len) {
  void *data;
  size_t n;
  uint64_t off, length;
  if (!vubd_arg_typed(env, argv[0], "buf", napi_uint8_array, "a Uint8Array", &data, &n) ||
      !vubd_arg_u64(env, argv[1], "offset", &off) || !vubd_arg_u64(env, argv[2], "length", &length))
    return false;
  if (off > n || length > n - off) return vubd_range_error(env, "length", "exceeds the buffer");
  *base = (uint8_t *)data + off;
  *len = (size_t)length;
  return true;
}

static napi_value recv_msg(napi_env env, napi_callback_info info) {
  VUBD_ARGS(5);
  int32_t fd;
  uint32_t max_fds;
  uint8_t *base;
  size_t len;
  if (!vubd_arg_i32(env, argv[0], "fd", &fd) || !get_span(env, argv + 1, &base, &len) ||
      !vubd_arg_u32(env, argv[4], "maxFds", &max_fds))
    return NULL;
  if (max_fds > MAX_FDS) return vubd_range_error(env, "maxFds", "must be <= 64"), NULL;

  union {
    struct cmsghdr align;
    char buf[CMSG_SPACE(MAX_FDS * sizeof(int))];
  } ctl;
  struct iovec iov = {base, len};
  struct msghdr msg = {0};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if (max_fds > 0) {
    msg.msg_control = ctl.buf;
    msg.msg_controllen = CMSG_SPACE(max_fds * sizeof(int));
  }
  ssize_t n;
  do n = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC);
  while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      napi_value nul;
      napi_get_null(env, &nul);
      return nul;
    }
    return vubd_throw_errno(env, "recvmsg", errno);
  }

  int fds[MAX_FDS];
  size_t nfds = 0;
  for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    size_t cnt = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    const unsigned char *p = CMSG_DATA(c);
    for (size_t i = 0; i < cnt; i++) {
      int f;
      memcpy(&f, p + i * sizeof(int), sizeof f);
      if (nfds < MAX_FDS) fds[nfds++] = f;
      else close(f); /* cannot happen with a bounded control buffer; never leak */
    }
  }

  napi_value res, jfds;
  bool ok = napi_create_object(env, &res) == napi_ok && napi_create_array_with_length(env, nfds, &jfds) == napi_ok;
  for (size_t i = 0; ok && i < nfds; i++) ok = napi_set_element(env, jfds, (uint32_t)i, vubd_int(env, fds[i])) == napi_ok;
  ok = ok && napi_set_named_property(env, res, "n", vubd_num(env, (double)n)) == napi_ok &&
       napi_set_named_property(env, res, "fds", jfds) == napi_ok &&
       napi_set_named_property(env, res, "truncated", vubd_bool(env, (msg.msg_flags & MSG_CTRUNC) != 0)) == napi_ok;
  if (!ok) {
    for (size_t i = 0; i < nfds; i++) close(fds[i]);
    return NULL;
  }
  return res;
}

static napi_value send_msg(napi_env env, napi_callback_info info) {
  VUBD_ARGS(5);
  int32_t fd;
  uint8_t *base;
  size_t len;
  if (!vubd_arg_i32(env, argv[0], "fd", &fd) || !get_span(env, argv + 1, &base, &len)) return NULL;

  int fds[MAX_FDS];
  uint32_t nfds = 0;
  napi_valuetype t;
  napi_typeof(env, argv[4], &t);
  if (t != napi_undefined && t != napi_null) {
    bool is_arr;
    if (napi_is_array(env, argv[4], &is_arr) != napi_ok || !is_arr) return vubd_type_error(env, "fds", "an array"), NULL;
    napi_get_array_length(env, argv[4], &nfds);
    if (nfds > MAX_FDS) return vubd_range_error(env, "fds", "must hold at most 64 fds"), NULL;
    for (uint32_t i = 0; i < nfds; i++) {
      napi_value e;
      int32_t f;
      if (napi_get_element(env, argv[4], i, &e) != napi_ok || !vubd_arg_i32(env, e, "fds[i]", &f)) return NULL;
      fds[i] = f;
    }
  }

  union {
    struct cmsghdr align;
    char buf[CMSG_SPACE(MAX_FDS * sizeof(int))];
  } ctl;
  struct iovec iov = {base, len};
  struct msghdr msg = {0};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if (nfds > 0) {
    memset(ctl.buf, 0, sizeof ctl.buf);
    msg.msg_control = ctl.buf;
    msg.msg_controllen = CMSG_SPACE(nfds * sizeof(int));
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(nfds * sizeof(int));
    memcpy(CMSG_DATA(c), fds, nfds * sizeof(int));
  }
  ssize_t n;
  do n = sendmsg(fd, &msg, MSG_NOSIGNAL);
  while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) return vubd_int(env, -1);
    return vubd_throw_errno(env, "sendmsg", errno);
  }
  return vubd_num(env, (double)n);
}

static napi_value set_blocking(napi_env env, napi_callback_info info) {
  VUBD_ARGS(2);
  int32_t fd;
  bool blocking;
  if (!vubd_arg_i32(env, argv[0], "fd", &fd) || !vubd_arg_bool(env, argv[1], &blocking)) return NULL;
  int fl = fcntl(fd, F_GETFL);
  if (fl < 0) return vubd_throw_errno(env, "fcntl", errno);
  int nfl = blocking ? (fl & ~O_NONBLOCK) : (fl | O_NONBLOCK);
  if (nfl != fl && fcntl(fd, F_SETFL, nfl) < 0) return vubd_throw_errno(env, "fcntl", errno);
  return NULL;
}

static napi_value close_fd(napi_env env, napi_callback_info info) {
  VUBD_ARGS(1);
  int32_t fd;
  if (!vubd_arg_i32(env, argv[0], "fd", &fd)) return NULL;
  /* On Linux the fd is released even when close() reports EINTR: never retry. */
  if (close(fd) < 0 && errno != EINTR) return vubd_throw_errno(env, "close", errno);
  return NULL;
}

static napi_value dup_fd(napi_env env, napi_callback_info info) {
  VUBD_ARGS(1);
  int32_t fd;
  if (!vubd_arg_i32(env, argv[0], "fd", &fd)) return NULL;
  int nfd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (nfd < 0) return vubd_throw_errno(env, "dup", errno);
  return vubd_int(env, nfd);
}

/* SO_PEERCRED of a connected unix socket, plus the peer's supplementary groups (SO_PEERGROUPS). */
static napi_value peer_cred(napi_env env, napi_callback_info info) {
  VUBD_ARGS(1);
  int32_t fd;
  if (!vubd_arg_i32(env, argv[0], "fd", &fd)) return NULL;
  struct ucred cred;
  socklen_t len = sizeof cred;
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) return vubd_throw_errno(env, "getsockopt(SO_PEERCRED)", errno);
  gid_t groups[256];
  socklen_t glen = sizeof groups;
  size_t ngroups = 0;
  /* ERANGE (more than 256 groups) or an old kernel: only the primary gid is known */
  if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups, &glen) == 0) ngroups = glen / sizeof(gid_t);
  napi_value res, jgroups;
  if (napi_create_object(env, &res) != napi_ok || napi_create_array_with_length(env, ngroups, &jgroups) != napi_ok) return NULL;
  for (size_t i = 0; i < ngroups; i++)
    if (napi_set_element(env, jgroups, (uint32_t)i, vubd_num(env, (double)groups[i])) != napi_ok) return NULL;
  if (napi_set_named_property(env, res, "pid", vubd_num(env, (double)cred.pid)) != napi_ok ||
      napi_set_named_property(env, res, "uid", vubd_num(env, (double)cred.uid)) != napi_ok ||
      napi_set_named_property(env, res, "gid", vubd_num(env, (double)cred.gid)) != napi_ok ||
      napi_set_named_property(env, res, "groups", jgroups) != napi_ok)
    return NULL;
  return res;
}

/* What an inherited fd is: {domain, type, listening}; throws ENOTSOCK for a non-socket. */
static napi_value socket_info(napi_env env, napi_callback_info info) {
  VUBD_ARGS(1);
  int32_t fd;
  if (!vubd_arg_i32(env, argv[0], "fd", &fd)) return NULL;
  int domain, type, acc;
  socklen_t l1 = sizeof domain, l2 = sizeof type, l3 = sizeof acc;
  if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &l1) < 0 || getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &l2) < 0 ||
      getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &acc, &l3) < 0)
    return vubd_throw_errno(env, "getsockopt", errno);
  napi_value res;
  if (napi_create_object(env, &res) != napi_ok) return NULL;
  napi_set_named_property(env, res, "unix", vubd_bool(env, domain == AF_UNIX));
  napi_set_named_property(env, res, "stream", vubd_bool(env, type == SOCK_STREAM));
  napi_set_named_property(env, res, "listening", vubd_bool(env, acc != 0));
  return res;
}

napi_status vubd_init_sockets(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      VUBD_FN("listenUnix", listen_unix), VUBD_FN("connectUnix", connect_unix),
      VUBD_FN("socketpair", socket_pair), VUBD_FN("accept", accept_conn),
      VUBD_FN("recvMsg", recv_msg),       VUBD_FN("sendMsg", send_msg),
      VUBD_FN("setBlocking", set_blocking), VUBD_FN("close", close_fd),
      VUBD_FN("dup", dup_fd),             VUBD_FN("peerCred", peer_cred),
      VUBD_FN("socketInfo", socket_info),
  };
  return napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}
