// vhost-user-blk load generator: a minimal vhost-user *front-end* (what QEMU does) that drives a
// back-end's split (or, with --packed, packed) virtqueues directly from host threads, without a guest.
//
//   gcc -O2 -pthread -o loadgen loadgen.c
//   loadgen --socket PATH [--queues N] [--qd N] [--bs BYTES] [--rw randread|randwrite|read|write]
//           [--size BYTES] [--time SECONDS] [--ramp SECONDS] [--wait spin|eventfd]
//           [--seg BYTES] [--indirect auto|always|never] [--qsize N] [--mem-mb N] [--packed] [--log] [--verbose]
//           [--rate IOPS] [--hist] [--ready] [--hold]
//
//   --time 0     run until SIGINT or SIGTERM (either also ends a timed run early; the JSON is printed)
//   --rate IOPS  per queue: submit at this steady rate (open loop), at most --qd in flight; split rings
//                only. With a low rate a frontend stays connected and its rings stay live but idle
//   --ready      print "loadgen: ready" on stderr once the rings are set up, before the first request
//   --hold       after setup (and "ready"), wait for SIGUSR1 before starting: many loadgens start together
//   --hist       add "hist": [[bucket_ns, count], ...] (the non-empty latency buckets) to the JSON, so
//                several loadgens' percentiles can be merged exactly
//
// Protocol: GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES (offered & (MQ|REPLY_ACK|CONFIG)),
// GET_QUEUE_NUM, SET_OWNER, GET_CONFIG(0, 60), SET_FEATURES (VERSION_1|EVENT_IDX|INDIRECT_DESC|
// PROTOCOL_FEATURES [|RING_PACKED with --packed; fatal if not offered], & offered), SET_MEM_TABLE (2 memfd regions, distinct GPAs, fake user addresses,
// NEED_REPLY when REPLY_ACK), then per ring SET_VRING_NUM/BASE/ADDR/KICK/CALL and SET_VRING_ENABLE(1).
// Every reply is checked: flags == 0x5, request echoes ours, size as expected.
// At the end: GET_VRING_BASE per ring (back-end drains and stops the ring), checked against our own
// ring state (split: next avail idx; packed: avail idx | avail wrap << 15 | used idx << 16 | used wrap << 31).
//
// Packed rings (virtio 1.1 §2.7): one 16-byte descriptor ring {addr, len, id, flags} per queue plus a
// driver and a device event suppression area {off_wrap, flags}; SET_VRING_ADDR carries desc = ring,
// avail = driver area, used = device area; SET_VRING_BASE starts at 0x80008000 (both wrap counters 1).
// A chain's descriptors are written, then the flags of all but the first, then the first's flags with
// release ordering. The buffer id (= slot number) goes in the last descriptor of a chain (earlier
// descriptors carry 0xffff, so a back-end reading the id from the head is caught), or in the indirect one.
// Output: one JSON line on stdout. Diagnostics on stderr. Exit 0 = ran (errors are counted in the JSON),
// 2 = protocol/setup failure, 3 = a ring stalled (hang).
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

// ---- vhost-user constants --------------------------------------------------------------------
enum {
  GET_FEATURES = 1, SET_FEATURES = 2, SET_OWNER = 3, SET_MEM_TABLE = 5, SET_LOG_BASE = 6, SET_VRING_NUM = 8,
  SET_VRING_ADDR = 9, SET_VRING_BASE = 10, GET_VRING_BASE = 11, SET_VRING_KICK = 12,
  SET_VRING_CALL = 13, GET_PROTOCOL_FEATURES = 15, SET_PROTOCOL_FEATURES = 16, GET_QUEUE_NUM = 17,
  SET_VRING_ENABLE = 18, GET_CONFIG = 24,
};
#define FLAG_VERSION 0x1u
#define FLAG_REPLY 0x4u
#define FLAG_NEED_REPLY 0x8u
#define PF_MQ 0
#define PF_LOG_SHMFD 1
#define PF_REPLY_ACK 3
#define PF_CONFIG 9
/* VIRTIO_BLK_F_FLUSH and CONFIG_WCE: a Linux guest acks both, and a backend that follows the spec
   serves a driver without FLUSH write-through (a flush after every write) */
#define F_BLK_FLUSH 9
#define F_BLK_CONFIG_WCE 11
#define F_LOG_ALL 26
#define F_INDIRECT_DESC 28
#define F_EVENT_IDX 29
#define F_PROTOCOL_FEATURES 30
#define F_VERSION_1 32
#define F_RING_PACKED 34
#define BIT(n) (1ull << (n))
#define CONFIG_SIZE 60 // sizeof(struct virtio_blk_config) in QEMU 7.2

// ---- virtio constants ------------------------------------------------------------------------
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VRING_AVAIL_F_NO_INTERRUPT 1
#define VRING_USED_F_NO_NOTIFY 1
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1

// packed rings
#define PDESC_F_AVAIL (1u << 7)
#define PDESC_F_USED (1u << 15)
#define PEVENT_ENABLE 0
#define PEVENT_DISABLE 1
#define PEVENT_DESC 2

struct vdesc { uint64_t addr; uint32_t len; uint16_t flags; uint16_t next; };
struct pdesc { uint64_t addr; uint32_t len; uint16_t id; uint16_t flags; };
struct pevent { uint16_t off_wrap, flags; };
struct blk_hdr { uint32_t type; uint32_t ioprio; uint64_t sector; };

static inline int need_event(uint16_t event, uint16_t new_idx, uint16_t old) {
  return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

// ---- options ---------------------------------------------------------------------------------
static const char *opt_socket;
static int opt_queues = 1, opt_qd = 1, opt_bs = 4096, opt_seg = 4096, opt_qsize = 0, opt_verbose = 0;
static int opt_rw_write = 0, opt_rw_rand = 1, opt_wait_spin = 1, opt_indirect = 0; // 0 auto 1 always -1 never
static int opt_packed = 0;
static int opt_log = 0; // --log: dirty logging on, as QEMU during a live migration
static uint64_t opt_size = 0, opt_mem_mb = 64;
static double opt_time = 10, opt_ramp = 0, opt_rate = 0;
static int opt_hist = 0, opt_ready = 0, opt_hold = 0;
static const char *opt_rw = "randread";

static void die(int code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "loadgen: ");
  vfprintf(stderr, fmt, ap);
  fprintf(stderr, "\n");
  va_end(ap);
  printf("{\"error\":\"fatal\",\"code\":%d}\n", code);
  fflush(stdout);
  exit(code);
}
#define vlog(...) do { if (opt_verbose) fprintf(stderr, "loadgen: " __VA_ARGS__); } while (0)

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}
static inline uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

// ---- guest memory: 2+ memfd regions with fake GPAs / user addresses ----------------------------
#define NREG 2
struct region { int fd; uint8_t *host; uint64_t gpa, uva, size, used; };
static struct region regs[NREG];

static void mem_init(uint64_t bytes_each) {
  for (int i = 0; i < NREG; i++) {
    struct region *r = &regs[i];
    r->fd = memfd_create(i ? "guest-ram1" : "guest-ram0", 0);
    if (r->fd < 0) die(2, "memfd_create: %s", strerror(errno));
    if (ftruncate(r->fd, bytes_each) < 0) die(2, "ftruncate: %s", strerror(errno));
    r->host = mmap(NULL, bytes_each, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd, 0);
    if (r->host == MAP_FAILED) die(2, "mmap: %s", strerror(errno));
    r->size = bytes_each;
    r->gpa = i == 0 ? 0x0ull : 0x100000000ull + (uint64_t)(i - 1) * 0x100000000ull; // 0, 4 GiB, ...
    r->uva = 0x7f0000000000ull + (uint64_t)i * 0x10000000000ull;                    // fake QEMU VAs
    r->used = 0;
  }
}
static void *mem_alloc(int reg, uint64_t len, uint64_t align) {
  struct region *r = &regs[reg % NREG];
  uint64_t off = (r->used + align - 1) & ~(align - 1);
  if (off + len > r->size) die(2, "guest memory region %d too small (raise --mem-mb)", reg % NREG);
  r->used = off + len;
  return r->host + off;
}
static struct region *mem_find(const void *p) {
  for (int i = 0; i < NREG; i++)
    if ((const uint8_t *)p >= regs[i].host && (const uint8_t *)p < regs[i].host + regs[i].size) return &regs[i];
  die(2, "internal: pointer outside guest memory");
  return NULL;
}
static uint64_t gpa_of(const void *p) { struct region *r = mem_find(p); return r->gpa + ((const uint8_t *)p - r->host); }
static uint64_t uva_of(const void *p) { struct region *r = mem_find(p); return r->uva + ((const uint8_t *)p - r->host); }

// ---- vhost-user messaging --------------------------------------------------------------------
static int sock = -1;
static uint64_t proto_features, features;
static int reply_ack;

struct msg { uint32_t request, flags, size; uint8_t payload[512]; } __attribute__((packed));

static const char *req_name(uint32_t r) {
  switch (r) {
  case GET_FEATURES: return "GET_FEATURES"; case SET_FEATURES: return "SET_FEATURES";
  case SET_OWNER: return "SET_OWNER"; case SET_MEM_TABLE: return "SET_MEM_TABLE";
  case SET_VRING_NUM: return "SET_VRING_NUM"; case SET_VRING_ADDR: return "SET_VRING_ADDR";
  case SET_VRING_BASE: return "SET_VRING_BASE"; case GET_VRING_BASE: return "GET_VRING_BASE";
  case SET_VRING_KICK: return "SET_VRING_KICK"; case SET_VRING_CALL: return "SET_VRING_CALL";
  case GET_PROTOCOL_FEATURES: return "GET_PROTOCOL_FEATURES"; case SET_PROTOCOL_FEATURES: return "SET_PROTOCOL_FEATURES";
  case GET_QUEUE_NUM: return "GET_QUEUE_NUM"; case SET_VRING_ENABLE: return "SET_VRING_ENABLE";
  case GET_CONFIG: return "GET_CONFIG";
  }
  return "?";
}

static void vu_send(uint32_t req, uint32_t flags, const void *payload, uint32_t size, const int *fds, int nfds) {
  struct msg m;
  m.request = req;
  m.flags = FLAG_VERSION | flags;
  m.size = size;
  if (size > sizeof m.payload) die(2, "internal: payload too big");
  if (size) memcpy(m.payload, payload, size);
  struct iovec iov = { .iov_base = &m, .iov_len = 12 + size };
  union { char buf[CMSG_SPACE(8 * sizeof(int))]; struct cmsghdr align; } u;
  struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
  if (nfds) {
    mh.msg_control = u.buf;
    mh.msg_controllen = CMSG_SPACE(nfds * sizeof(int));
    struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(nfds * sizeof(int));
    memcpy(CMSG_DATA(c), fds, nfds * sizeof(int));
  }
  ssize_t n;
  do n = sendmsg(sock, &mh, MSG_NOSIGNAL); while (n < 0 && errno == EINTR);
  if (n != (ssize_t)(12 + size)) die(2, "sendmsg %s: %s", req_name(req), n < 0 ? strerror(errno) : "short write");
  vlog("-> %s size=%u fds=%d flags=0x%x\n", req_name(req), size, nfds, m.flags);
}

static void read_full(void *buf, size_t len, const char *what) {
  size_t got = 0;
  while (got < len) {
    ssize_t n = recv(sock, (uint8_t *)buf + got, len - got, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) die(2, "no reply to %s within 10 s", what);
    if (n <= 0) die(2, "reading reply to %s: %s", what, n < 0 ? strerror(errno) : "connection closed by back-end");
    got += n;
  }
}

// Reads a reply to req and checks flags == 0x5, request echo and exact payload size.
static void vu_recv(uint32_t req, void *payload, uint32_t size) {
  struct { uint32_t request, flags, size; } h;
  read_full(&h, 12, req_name(req));
  if (h.request != req) die(2, "reply to %s has request %u (%s)", req_name(req), h.request, req_name(h.request));
  if (h.flags != (FLAG_REPLY | FLAG_VERSION)) die(2, "reply to %s has flags 0x%x, expected 0x5", req_name(req), h.flags);
  if (h.size != size) die(2, "reply to %s has size %u, expected %u", req_name(req), h.size, size);
  if (size) read_full(payload, size, req_name(req));
  vlog("<- %s size=%u\n", req_name(req), size);
}

static uint64_t vu_get_u64(uint32_t req) {
  uint64_t v;
  vu_send(req, 0, NULL, 0, NULL, 0);
  vu_recv(req, &v, 8);
  return v;
}
// A message without a reply body; with REPLY_ACK negotiated and ack set, waits for the u64 ack (0 = ok).
static void vu_set(uint32_t req, const void *payload, uint32_t size, const int *fds, int nfds, int ack) {
  ack = ack && reply_ack;
  vu_send(req, ack ? FLAG_NEED_REPLY : 0, payload, size, fds, nfds);
  if (ack) {
    uint64_t v;
    vu_recv(req, &v, 8);
    if (v != 0) die(2, "%s failed: back-end acked with %" PRIu64, req_name(req), v);
  }
}
static void vu_set_u64(uint32_t req, uint64_t v, const int *fds, int nfds, int ack) { vu_set(req, &v, 8, fds, nfds, ack); }
struct vring_state { uint32_t index, num; };
static void vu_set_state(uint32_t req, uint32_t index, uint32_t num, int ack) {
  struct vring_state s = { index, num };
  vu_set(req, &s, sizeof s, NULL, 0, ack);
}

// ---- per-queue state ---------------------------------------------------------------------------
#define HBITS 6 // log2-linear histogram: 64 sub-buckets per power of two (~1.5 % resolution)
#define HSUB (1 << HBITS)
#define HBUCKETS (64 * HSUB)

struct slot {
  struct blk_hdr *hdr;
  uint8_t *status;
  uint8_t *data;
  struct vdesc *itable; // indirect table (NULL when direct)
  uint64_t t_submit;
  uint16_t ndesc;       // packed: ring descriptors the chain occupies
  uint8_t busy;         // packed: submitted and not yet used
};

struct queue {
  int index, kickfd, callfd;
  uint16_t qsize, stride;
  struct vdesc *desc;
  uint16_t *avail; // flags, idx, ring[qsize], used_event
  uint8_t *used;   // flags u16, idx u16, ring[qsize]{u32 id,u32 len}, avail_event u16
  uint16_t avail_idx, last_used;
  // packed rings
  struct pdesc *pring;
  struct pevent *drv_evt, *dev_evt; // driver area (we write), device area (back-end writes)
  uint16_t p_avail, p_used, p_added; // next avail position, next used position, descriptors added since last kick check
  uint8_t p_avail_wrap, p_used_wrap;
  struct slot *slots;
  uint64_t rng, seq_pos, seq_start, seq_len;
  // results
  uint64_t ops, errors, bytes, kicks, sleeps, wakeups, len_mismatch, lat_sum, lat_max;
  uint64_t hist[HBUCKETS];
  volatile uint64_t progress; // completions so far (watchdog)
  volatile int inflight, done;
  pthread_t thr;
};

static struct queue *queues;
static int nseg, use_indirect, event_idx;
static uint64_t disk_bytes;
static volatile int stop_flag, abort_flag;
static volatile sig_atomic_t sig_stop; // SIGINT/SIGTERM: end the run as if its time were up
static void on_stop_signal(int sig) { (void)sig; sig_stop = 1; }
static uint64_t t_ramp_end_ns;
static double t_start, t_deadline;

static inline uint16_t *used_idx_p(struct queue *q) { return (uint16_t *)(q->used + 2); }
static inline uint32_t *used_elem(struct queue *q, uint16_t i) { return (uint32_t *)(q->used + 4 + 8 * (i & (q->qsize - 1))); }
static inline uint16_t *avail_event_p(struct queue *q) { return (uint16_t *)(q->used + 4 + 8 * q->qsize); }
static inline uint16_t *used_event_p(struct queue *q) { return &q->avail[2 + q->qsize]; }

static void hist_add(uint64_t *h, uint64_t ns) {
  int b;
  if (ns < HSUB) b = (int)ns;
  else {
    int msb = 63 - __builtin_clzll(ns);
    int shift = msb - HBITS;
    b = (shift + 1) * HSUB + (int)((ns >> shift) & (HSUB - 1));
  }
  if (b >= HBUCKETS) b = HBUCKETS - 1;
  h[b]++;
}
static double hist_value(int b) { // bucket midpoint in ns
  if (b < HSUB) return b;
  int shift = b / HSUB - 1;
  uint64_t lo = ((uint64_t)(HSUB + b % HSUB)) << shift;
  return lo + ((1ull << shift) / 2.0);
}
static double hist_pct(const uint64_t *h, uint64_t total, double p) {
  if (!total) return 0;
  uint64_t want = (uint64_t)(p * total);
  if (want >= total) want = total - 1;
  uint64_t acc = 0;
  for (int b = 0; b < HBUCKETS; b++) {
    acc += h[b];
    if (acc > want) return hist_value(b);
  }
  return hist_value(HBUCKETS - 1);
}

static inline uint64_t xorshift(uint64_t *s) {
  uint64_t x = *s;
  x ^= x << 13; x ^= x >> 7; x ^= x << 17;
  return *s = x;
}

static void setup_queue_memory(struct queue *q) {
  int rr = q->index % NREG; // rings in one region, request metadata/data alternate between regions
  if (opt_packed) {
    q->pring = mem_alloc(rr, 16ull * q->qsize, 4096);
    q->drv_evt = mem_alloc(rr, sizeof(struct pevent), 64);
    q->dev_evt = mem_alloc(rr, sizeof(struct pevent), 64);
    q->p_avail = q->p_used = 0;
    q->p_avail_wrap = q->p_used_wrap = 1;
  } else {
    q->desc = mem_alloc(rr, 16ull * q->qsize, 4096);
    q->avail = mem_alloc(rr, 6 + 2ull * q->qsize, 4096);
    q->used = mem_alloc(rr, 6 + 8ull * q->qsize, 4096);
  }
  q->slots = calloc(opt_qd, sizeof *q->slots);
  for (int i = 0; i < opt_qd; i++) {
    struct slot *s = &q->slots[i];
    int mr = (q->index + i) % NREG, dr = (q->index + i + 1) % NREG;
    s->hdr = mem_alloc(mr, sizeof(struct blk_hdr), 16);
    s->status = mem_alloc(mr, 1, 1);
    if (use_indirect) s->itable = mem_alloc(mr, 16ull * (nseg + 2), 16);
    s->data = mem_alloc(dr, opt_bs, 4096);
    if (opt_rw_write)
      for (int k = 0; k < opt_bs; k++) s->data[k] = (uint8_t)(k * 7 + i + q->index * 13);
  }
  q->rng = 0x9E3779B97F4A7C15ull ^ ((uint64_t)(q->index + 1) * 0xBF58476D1CE4E5B9ull) ^ (uint64_t)getpid();
  uint64_t blocks = disk_bytes / opt_bs;
  q->seq_len = blocks / opt_queues;
  if (q->seq_len == 0) q->seq_len = 1;
  q->seq_start = (uint64_t)q->index * q->seq_len;
  q->seq_pos = 0;
}

// Picks the next block and fills slot s's request header and status byte.
static void prep_request(struct queue *q, struct slot *s) {
  uint64_t blocks = disk_bytes / opt_bs, blk;
  if (opt_rw_rand) blk = xorshift(&q->rng) % blocks;
  else { blk = q->seq_start + q->seq_pos; if (++q->seq_pos >= q->seq_len) q->seq_pos = 0; if (blk >= blocks) blk = 0; }
  s->hdr->type = opt_rw_write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN;
  s->hdr->ioprio = 0;
  s->hdr->sector = blk * (opt_bs / 512);
  *s->status = 0xff;
}

// Records the completion of slot s (seen at time t) in the queue's results.
static void account(struct queue *q, struct slot *s, uint32_t len, uint32_t expect_len, uint64_t t) {
  if (t >= t_ramp_end_ns && s->t_submit >= t_ramp_end_ns) {
    q->ops++;
    q->bytes += opt_bs;
    if (*s->status != 0) q->errors++;
    if (len != expect_len) q->len_mismatch++;
    uint64_t lat = t - s->t_submit;
    hist_add(q->hist, lat);
    q->lat_sum += lat;
    if (lat > q->lat_max) q->lat_max = lat;
  } else if (*s->status != 0) q->errors++;
}

// Fills slot i's descriptors and puts its head on the avail ring (not yet published).
static void submit(struct queue *q, int i) {
  struct slot *s = &q->slots[i];
  prep_request(q, s);
  uint16_t head = (uint16_t)(i * q->stride);
  struct vdesc *t = use_indirect ? s->itable : &q->desc[head];
  uint16_t base = use_indirect ? 0 : head; // "next" values are table-relative
  int n = 0;
  t[n] = (struct vdesc){ gpa_of(s->hdr), sizeof(struct blk_hdr), VRING_DESC_F_NEXT, (uint16_t)(base + n + 1) }; n++;
  for (int k = 0; k < nseg; k++) {
    uint32_t len = (uint32_t)((k == nseg - 1) ? opt_bs - (uint64_t)k * opt_seg : (uint64_t)opt_seg);
    t[n] = (struct vdesc){ gpa_of(s->data + (uint64_t)k * opt_seg), len,
                           (uint16_t)(VRING_DESC_F_NEXT | (opt_rw_write ? 0 : VRING_DESC_F_WRITE)), (uint16_t)(base + n + 1) };
    n++;
  }
  t[n] = (struct vdesc){ gpa_of(s->status), 1, VRING_DESC_F_WRITE, 0 }; n++;
  if (use_indirect) q->desc[head] = (struct vdesc){ gpa_of(s->itable), 16u * n, VRING_DESC_F_INDIRECT, 0 };
  q->avail[2 + (q->avail_idx & (q->qsize - 1))] = head;
  q->avail_idx++;
  s->t_submit = now_ns();
  q->inflight++;
}

// Publishes avail->idx and kicks if the device asked for it.
static void publish(struct queue *q, uint16_t old) {
  if (q->avail_idx == old) return;
  __atomic_store_n(&q->avail[1], q->avail_idx, __ATOMIC_RELEASE);
  __atomic_thread_fence(__ATOMIC_SEQ_CST); // store avail idx before loading avail_event / used flags
  int kick;
  if (event_idx) kick = need_event(__atomic_load_n(avail_event_p(q), __ATOMIC_ACQUIRE), q->avail_idx, old);
  else kick = !(__atomic_load_n((uint16_t *)q->used, __ATOMIC_ACQUIRE) & VRING_USED_F_NO_NOTIFY);
  if (kick) {
    uint64_t one = 1;
    if (write(q->kickfd, &one, 8) != 8) die(2, "kick write: %s", strerror(errno));
    q->kicks++;
  }
}

static void set_interrupts(struct queue *q, int enable) {
  if (event_idx) {
    // enable: "call me when the next used entry appears"; disable: Linux's trick of pointing far ahead.
    __atomic_store_n(used_event_p(q), (uint16_t)(enable ? q->last_used : q->last_used + 0x8000), __ATOMIC_RELEASE);
  } else {
    __atomic_store_n(&q->avail[0], (uint16_t)(enable ? 0 : VRING_AVAIL_F_NO_INTERRUPT), __ATOMIC_RELEASE);
  }
}

static void *queue_thread(void *arg) {
  struct queue *q = arg;
  uint32_t expect_len = opt_rw_write ? 1 : (uint32_t)opt_bs + 1;
  set_interrupts(q, !opt_wait_spin);
  uint16_t old = q->avail_idx;
  for (int i = 0; i < opt_qd; i++) submit(q, i);
  publish(q, old);
  for (;;) {
    uint16_t uidx = __atomic_load_n(used_idx_p(q), __ATOMIC_ACQUIRE);
    if (uidx != q->last_used) {
      uint64_t t = now_ns();
      int stopping = stop_flag;
      old = q->avail_idx;
      while (q->last_used != uidx) {
        uint32_t *e = used_elem(q, q->last_used);
        uint32_t id = e[0], len = e[1];
        q->last_used++;
        if (id % q->stride || id / q->stride >= (uint32_t)opt_qd) {
          fprintf(stderr, "loadgen: queue %d: used ring names id %u, not a head we submitted\n", q->index, id);
          abort_flag = 1;
          break;
        }
        int i = id / q->stride;
        struct slot *s = &q->slots[i];
        q->inflight--;
        account(q, s, len, expect_len, t);
        if (!stopping) submit(q, i);
      }
      q->progress += 1;
      publish(q, old);
      if (opt_wait_spin && event_idx) set_interrupts(q, 0); // keep used_event far ahead
      if (stopping && q->inflight == 0) break;
      if (abort_flag) break;
      continue;
    }
    if (abort_flag) break;
    if (stop_flag && q->inflight == 0) break;
    if (opt_wait_spin) {
      __builtin_ia32_pause();
      continue;
    }
    // eventfd: re-enable interrupts, re-check the used ring, then block on the call fd.
    set_interrupts(q, 1);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(used_idx_p(q), __ATOMIC_ACQUIRE) != q->last_used) continue;
    // The back-end shares this file description and may have set O_NONBLOCK on it (QSD does), so
    // wait in poll() and then consume the counter with read().
    uint64_t v;
    struct pollfd pfd = { .fd = q->callfd, .events = POLLIN };
    q->sleeps++;
    if (poll(&pfd, 1, -1) < 0 && errno != EINTR) die(2, "call fd poll: %s", strerror(errno));
    ssize_t n = read(q->callfd, &v, 8);
    if (n < 0 && errno != EINTR && errno != EAGAIN) die(2, "call fd read: %s", strerror(errno));
    if (n == 8) q->wakeups++;
  }
  q->done = 1;
  return NULL;
}

// --rate: open-loop pacing. Requests go out at fixed intervals while a slot is free; between them
// the thread sleeps on the call fd with a timeout (eventfd mode) or spins. Split rings only.
static void *queue_thread_paced(void *arg) {
  struct queue *q = arg;
  uint32_t expect_len = opt_rw_write ? 1 : (uint32_t)opt_bs + 1;
  int *freel = malloc(sizeof(int) * opt_qd), nfree = 0;
  for (int i = opt_qd - 1; i >= 0; i--) freel[nfree++] = i;
  const uint64_t interval = (uint64_t)(1e9 / opt_rate);
  uint64_t next = now_ns();
  set_interrupts(q, !opt_wait_spin);
  for (;;) {
    uint16_t uidx = __atomic_load_n(used_idx_p(q), __ATOMIC_ACQUIRE);
    if (uidx != q->last_used) {
      uint64_t t = now_ns();
      while (q->last_used != uidx) {
        uint32_t *e = used_elem(q, q->last_used);
        uint32_t id = e[0], len = e[1];
        q->last_used++;
        if (id % q->stride || id / q->stride >= (uint32_t)opt_qd) {
          fprintf(stderr, "loadgen: queue %d: used ring names id %u, not a head we submitted\n", q->index, id);
          abort_flag = 1;
          break;
        }
        q->inflight--;
        account(q, &q->slots[id / q->stride], len, expect_len, t);
        freel[nfree++] = (int)(id / q->stride);
      }
      q->progress += 1;
      if (opt_wait_spin && event_idx) set_interrupts(q, 0);
    }
    if (abort_flag) break;
    if (stop_flag) {
      if (q->inflight == 0) break;
    } else {
      uint64_t t = now_ns();
      if (t > next + 1000000000ull) next = t; // fell a second behind (all slots busy): no catch-up burst
      uint16_t old = q->avail_idx;
      while (nfree > 0 && t >= next) {
        submit(q, freel[--nfree]);
        next += interval;
      }
      publish(q, old);
    }
    if (__atomic_load_n(used_idx_p(q), __ATOMIC_ACQUIRE) != q->last_used) continue;
    if (opt_wait_spin) {
      __builtin_ia32_pause();
      continue;
    }
    set_interrupts(q, 1);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(used_idx_p(q), __ATOMIC_ACQUIRE) != q->last_used) continue;
    // sleep until the next submission is due (if a slot is free) or a completion arrives; at most
    // 50 ms so a stop is noticed
    uint64_t t = now_ns(), wait = 50000000ull;
    if (!stop_flag && nfree > 0) wait = next > t ? next - t : 0;
    if (wait > 50000000ull) wait = 50000000ull;
    struct timespec ts = { (time_t)(wait / 1000000000ull), (long)(wait % 1000000000ull) };
    struct pollfd pfd = { .fd = q->callfd, .events = POLLIN };
    q->sleeps++;
    int pr = ppoll(&pfd, 1, &ts, NULL);
    if (pr < 0 && errno != EINTR) die(2, "call fd poll: %s", strerror(errno));
    if (pr > 0) {
      uint64_t v;
      ssize_t n = read(q->callfd, &v, 8);
      if (n < 0 && errno != EINTR && errno != EAGAIN) die(2, "call fd read: %s", strerror(errno));
      if (n == 8) q->wakeups++;
    }
  }
  free(freel);
  q->done = 1;
  return NULL;
}

// ---- packed rings --------------------------------------------------------------------------------
// Fills slot i's chain at the next avail position(s) and makes it available (head flags last,
// release). Not yet kicked: publish_packed() decides that for the whole batch.
static void submit_packed(struct queue *q, int i) {
  struct slot *s = &q->slots[i];
  prep_request(q, s);
  uint16_t pos = q->p_avail, head = pos, head_flags = 0;
  uint8_t wrap = q->p_avail_wrap;
  // the chain as plain {addr, len, flags} entries
  struct seg { uint64_t addr; uint32_t len; uint16_t flags; } c[nseg + 2];
  int n = 0;
  c[n++] = (struct seg){ gpa_of(s->hdr), sizeof(struct blk_hdr), 0 };
  for (int k = 0; k < nseg; k++) {
    uint32_t len = (uint32_t)((k == nseg - 1) ? opt_bs - (uint64_t)k * opt_seg : (uint64_t)opt_seg);
    c[n++] = (struct seg){ gpa_of(s->data + (uint64_t)k * opt_seg), len, (uint16_t)(opt_rw_write ? 0 : VRING_DESC_F_WRITE) };
  }
  c[n++] = (struct seg){ gpa_of(s->status), 1, VRING_DESC_F_WRITE };
  int ndesc;
  if (use_indirect) {
    // indirect table: sequential, WRITE is the only valid flag, ids reserved
    struct pdesc *t = (struct pdesc *)s->itable;
    for (int k = 0; k < n; k++) t[k] = (struct pdesc){ c[k].addr, c[k].len, 0, c[k].flags };
    struct pdesc *d = &q->pring[pos];
    d->addr = gpa_of(t);
    d->len = 16u * n;
    d->id = (uint16_t)i;
    head_flags = (uint16_t)(VRING_DESC_F_INDIRECT | (wrap ? PDESC_F_AVAIL : PDESC_F_USED));
    if (++pos == q->qsize) { pos = 0; wrap ^= 1; }
    ndesc = 1;
  } else {
    for (int k = 0; k < n; k++) {
      struct pdesc *d = &q->pring[pos];
      d->addr = c[k].addr;
      d->len = c[k].len;
      d->id = k == n - 1 ? (uint16_t)i : 0xffff;
      uint16_t f = (uint16_t)(c[k].flags | (k < n - 1 ? VRING_DESC_F_NEXT : 0) | (wrap ? PDESC_F_AVAIL : PDESC_F_USED));
      if (k == 0) head_flags = f;
      else __atomic_store_n(&d->flags, f, __ATOMIC_RELAXED); // ordered before the head's release store
      if (++pos == q->qsize) { pos = 0; wrap ^= 1; }
    }
    ndesc = n;
  }
  s->ndesc = (uint16_t)ndesc;
  s->busy = 1;
  s->t_submit = now_ns();
  __atomic_store_n(&q->pring[head].flags, head_flags, __ATOMIC_RELEASE);
  q->p_avail = pos;
  q->p_avail_wrap = wrap;
  q->p_added += (uint16_t)ndesc;
  q->inflight++;
}

// Kicks if the device event suppression area asks for it (Linux's virtqueue_kick_prepare_packed).
static void publish_packed(struct queue *q) {
  if (!q->p_added) return;
  __atomic_thread_fence(__ATOMIC_SEQ_CST); // descriptors visible before reading the device area
  uint16_t new_idx = q->p_avail, old = (uint16_t)(q->p_avail - q->p_added);
  q->p_added = 0;
  uint32_t snap = __atomic_load_n((uint32_t *)q->dev_evt, __ATOMIC_ACQUIRE);
  uint16_t off_wrap = (uint16_t)snap, flags = (uint16_t)(snap >> 16);
  int kick;
  if (flags != PEVENT_DESC) kick = flags != PEVENT_DISABLE;
  else {
    uint16_t ev = off_wrap & 0x7fff;
    if ((off_wrap >> 15) != q->p_avail_wrap) ev = (uint16_t)(ev - q->qsize);
    kick = need_event(ev, new_idx, old);
  }
  if (kick) {
    uint64_t one = 1;
    if (write(q->kickfd, &one, 8) != 8) die(2, "kick write: %s", strerror(errno));
    q->kicks++;
  }
}

// Driver event suppression: eventfd mode asks for a call at the next used descriptor (EVENT_IDX)
// or for every one; spin mode disables calls.
static void set_interrupts_packed(struct queue *q, int enable) {
  if (!enable) { __atomic_store_n(&q->drv_evt->flags, (uint16_t)PEVENT_DISABLE, __ATOMIC_RELEASE); return; }
  if (event_idx) {
    __atomic_store_n(&q->drv_evt->off_wrap, (uint16_t)(q->p_used | (q->p_used_wrap << 15)), __ATOMIC_RELAXED);
    __atomic_store_n(&q->drv_evt->flags, (uint16_t)PEVENT_DESC, __ATOMIC_RELEASE);
  } else __atomic_store_n(&q->drv_evt->flags, (uint16_t)PEVENT_ENABLE, __ATOMIC_RELEASE);
}

static inline int used_ready_packed(struct queue *q) {
  uint16_t f = __atomic_load_n(&q->pring[q->p_used].flags, __ATOMIC_ACQUIRE);
  return !!(f & PDESC_F_AVAIL) == q->p_used_wrap && !!(f & PDESC_F_USED) == q->p_used_wrap;
}

static uint32_t packed_base(const struct queue *q) {
  return (uint32_t)q->p_avail | (uint32_t)q->p_avail_wrap << 15 | (uint32_t)q->p_used << 16 | (uint32_t)q->p_used_wrap << 31;
}

static void *queue_thread_packed(void *arg) {
  struct queue *q = arg;
  uint32_t expect_len = opt_rw_write ? 1 : (uint32_t)opt_bs + 1;
  set_interrupts_packed(q, !opt_wait_spin);
  for (int i = 0; i < opt_qd; i++) submit_packed(q, i);
  publish_packed(q);
  for (;;) {
    if (used_ready_packed(q)) {
      uint64_t t = now_ns();
      int stopping = stop_flag;
      do {
        struct pdesc *d = &q->pring[q->p_used];
        uint16_t id = d->id;
        uint32_t len = d->len;
        if (id >= (uint32_t)opt_qd || !q->slots[id].busy) {
          fprintf(stderr, "loadgen: queue %d: used descriptor at %u (wrap %u) names id %u, not a buffer in flight\n",
                  q->index, q->p_used, q->p_used_wrap, id);
          abort_flag = 1;
          break;
        }
        struct slot *s = &q->slots[id];
        s->busy = 0;
        q->p_used += s->ndesc;
        if (q->p_used >= q->qsize) { q->p_used -= q->qsize; q->p_used_wrap ^= 1; }
        q->inflight--;
        // A descriptor resubmitted earlier in this loop is visible to the device at once and may be
        // used already: its completion time is later than the one read before the loop.
        if (s->t_submit > t) t = now_ns();
        account(q, s, len, expect_len, t);
        if (!stopping) submit_packed(q, id);
      } while (used_ready_packed(q));
      q->progress += 1;
      publish_packed(q);
      if (stopping && q->inflight == 0) break;
      if (abort_flag) break;
      continue;
    }
    if (abort_flag) break;
    if (stop_flag && q->inflight == 0) break;
    if (opt_wait_spin) {
      __builtin_ia32_pause();
      continue;
    }
    set_interrupts_packed(q, 1);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (used_ready_packed(q)) continue;
    uint64_t v;
    struct pollfd pfd = { .fd = q->callfd, .events = POLLIN };
    q->sleeps++;
    if (poll(&pfd, 1, -1) < 0 && errno != EINTR) die(2, "call fd poll: %s", strerror(errno));
    ssize_t n = read(q->callfd, &v, 8);
    if (n < 0 && errno != EINTR && errno != EAGAIN) die(2, "call fd read: %s", strerror(errno));
    if (n == 8) q->wakeups++;
  }
  q->done = 1;
  return NULL;
}

// ---- main --------------------------------------------------------------------------------------
static void usage(void) {
  fprintf(stderr,
          "usage: loadgen --socket PATH [--queues N] [--qd N] [--bs BYTES] [--rw randread|randwrite|read|write]\n"
          "               [--size BYTES] [--time S] [--ramp S] [--wait spin|eventfd] [--seg BYTES]\n"
          "               [--indirect auto|always|never] [--qsize N] [--mem-mb N] [--packed] [--log] [--verbose]\n"
          "               [--rate IOPS] [--hist] [--ready] [--hold]\n"
          "  --time 0: until SIGINT/SIGTERM; --rate: per-queue open-loop rate (split rings);\n"
          "  --hist: the latency histogram's non-empty buckets in the JSON; --ready: 'loadgen: ready' on stderr\n"
          "  after setup; --hold: then wait for SIGUSR1 before the first request\n");
  exit(2);
}

static uint64_t parse_size(const char *s) {
  char *end;
  double v = strtod(s, &end);
  switch (*end) {
  case 'k': case 'K': v *= 1024; break;
  case 'm': case 'M': v *= 1024 * 1024; break;
  case 'g': case 'G': v *= 1024.0 * 1024 * 1024; break;
  case 't': case 'T': v *= 1024.0 * 1024 * 1024 * 1024; break;
  case 0: break;
  default: die(2, "bad size '%s'", s);
  }
  return (uint64_t)v;
}

int main(int argc, char **argv) {
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define ARG(name) (!strcmp(a, name) && v && (i++, 1))
    if (ARG("--socket")) opt_socket = v;
    else if (ARG("--queues")) opt_queues = atoi(v);
    else if (ARG("--qd")) opt_qd = atoi(v);
    else if (ARG("--bs")) opt_bs = (int)parse_size(v);
    else if (ARG("--seg")) opt_seg = (int)parse_size(v);
    else if (ARG("--size")) opt_size = parse_size(v);
    else if (ARG("--time")) opt_time = atof(v);
    else if (ARG("--ramp")) opt_ramp = atof(v);
    else if (ARG("--rate")) opt_rate = atof(v);
    else if (ARG("--qsize")) opt_qsize = atoi(v);
    else if (ARG("--mem-mb")) opt_mem_mb = parse_size(v);
    else if (ARG("--rw")) opt_rw = v;
    else if (ARG("--wait")) {
      if (!strcmp(v, "spin")) opt_wait_spin = 1; else if (!strcmp(v, "eventfd")) opt_wait_spin = 0; else usage();
    } else if (ARG("--indirect")) {
      if (!strcmp(v, "auto")) opt_indirect = 0; else if (!strcmp(v, "always")) opt_indirect = 1;
      else if (!strcmp(v, "never")) opt_indirect = -1; else usage();
    } else if (!strcmp(a, "--packed")) opt_packed = 1;
    else if (!strcmp(a, "--log")) opt_log = 1;
    else if (!strcmp(a, "--hist")) opt_hist = 1;
    else if (!strcmp(a, "--ready")) opt_ready = 1;
    else if (!strcmp(a, "--hold")) opt_hold = 1;
    else if (!strcmp(a, "--verbose") || !strcmp(a, "-v")) opt_verbose = 1;
    else usage();
  }
  if (!opt_socket) usage();
  if (!strcmp(opt_rw, "randread")) { opt_rw_rand = 1; opt_rw_write = 0; }
  else if (!strcmp(opt_rw, "randwrite")) { opt_rw_rand = 1; opt_rw_write = 1; }
  else if (!strcmp(opt_rw, "read")) { opt_rw_rand = 0; opt_rw_write = 0; }
  else if (!strcmp(opt_rw, "write")) { opt_rw_rand = 0; opt_rw_write = 1; }
  else usage();
  if (opt_queues < 1 || opt_queues > 64 || opt_qd < 1 || opt_qd > 1024) die(2, "bad --queues/--qd");
  if (opt_bs < 512 || opt_bs % 512 || opt_seg < 512 || opt_seg % 512) die(2, "--bs/--seg must be multiples of 512");
  nseg = (opt_bs + opt_seg - 1) / opt_seg;
  if (opt_time < 0 || opt_ramp < 0) die(2, "--time/--ramp must be >= 0");
  if (opt_rate < 0 || (opt_rate > 0 && opt_rate < 0.1)) die(2, "--rate must be at least 0.1 (requests per second per queue)");
  if (opt_rate > 0 && opt_packed) die(2, "--rate is implemented for split rings only (not with --packed)");
  struct sigaction sa_stop = { .sa_handler = on_stop_signal };
  sigemptyset(&sa_stop.sa_mask);
  sigaction(SIGINT, &sa_stop, NULL);
  sigaction(SIGTERM, &sa_stop, NULL);
  // --hold: SIGUSR1 (whose default action kills) is blocked from the start and taken with sigwait,
  // as are SIGINT/SIGTERM while holding (a stop then ends the run at once)
  sigset_t held;
  sigemptyset(&held);
  sigaddset(&held, SIGUSR1);
  sigaddset(&held, SIGINT);
  sigaddset(&held, SIGTERM);
  if (opt_hold) sigprocmask(SIG_BLOCK, &held, NULL);

  sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  snprintf(sa.sun_path, sizeof sa.sun_path, "%s", opt_socket);
  if (connect(sock, (struct sockaddr *)&sa, sizeof sa) < 0) die(2, "connect %s: %s", opt_socket, strerror(errno));
  struct timeval tv = { .tv_sec = 10 };
  setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);

  // --- negotiation, as QEMU's vhost-user-blk does it ---
  uint64_t offered = vu_get_u64(GET_FEATURES);
  if (offered & BIT(F_PROTOCOL_FEATURES)) {
    uint64_t pf = vu_get_u64(GET_PROTOCOL_FEATURES);
    proto_features = pf & (BIT(PF_MQ) | BIT(PF_REPLY_ACK) | BIT(PF_CONFIG) | (opt_log ? BIT(PF_LOG_SHMFD) : 0));
    if (opt_log && !(pf & BIT(PF_LOG_SHMFD))) die(2, "--log: back-end does not offer LOG_SHMFD");
    vu_set_u64(SET_PROTOCOL_FEATURES, proto_features, NULL, 0, 0);
    reply_ack = !!(proto_features & BIT(PF_REPLY_ACK));
  }
  int max_queues = 1;
  if (proto_features & BIT(PF_MQ)) max_queues = (int)vu_get_u64(GET_QUEUE_NUM);
  if (opt_queues > max_queues) die(2, "back-end supports %d queues, %d requested", max_queues, opt_queues);
  vu_set(SET_OWNER, NULL, 0, NULL, 0, 0);
  uint64_t capacity = 0;
  if (proto_features & BIT(PF_CONFIG)) {
    struct { uint32_t offset, size, flags; uint8_t cfg[CONFIG_SIZE]; } c = { 0, CONFIG_SIZE, 0, { 0 } };
    vu_send(GET_CONFIG, 0, &c, sizeof c, NULL, 0);
    vu_recv(GET_CONFIG, &c, sizeof c);
    if (c.offset != 0 || c.size != CONFIG_SIZE) die(2, "GET_CONFIG reply has offset %u size %u", c.offset, c.size);
    memcpy(&capacity, c.cfg, 8);
  }
  if (opt_packed && !(offered & BIT(F_RING_PACKED)))
    die(2, "--packed: back-end does not offer VIRTIO_F_RING_PACKED (feature bit 34; offered features 0x%" PRIx64 ")", offered);
  if (opt_packed && !(offered & BIT(F_VERSION_1))) die(2, "--packed: back-end offers RING_PACKED without VERSION_1");
  features = offered & (BIT(F_VERSION_1) | BIT(F_EVENT_IDX) | BIT(F_INDIRECT_DESC) | BIT(F_PROTOCOL_FEATURES) | BIT(F_BLK_FLUSH) | BIT(F_BLK_CONFIG_WCE) |
                        (opt_packed ? BIT(F_RING_PACKED) : 0) | (opt_log ? BIT(F_LOG_ALL) : 0));
  if (opt_log && !(offered & BIT(F_LOG_ALL))) die(2, "--log: back-end does not offer VHOST_F_LOG_ALL");
  vu_set_u64(SET_FEATURES, features, NULL, 0, 0);
  event_idx = !!(features & BIT(F_EVENT_IDX));
  int have_indirect = !!(features & BIT(F_INDIRECT_DESC));
  if (opt_indirect == 1 && !have_indirect) die(2, "--indirect always but back-end does not offer INDIRECT_DESC");
  use_indirect = opt_indirect == 1 || (opt_indirect == 0 && have_indirect && nseg + 2 > 3);

  disk_bytes = opt_size ? opt_size : capacity * 512;
  if (opt_size && capacity && opt_size > capacity * 512) die(2, "--size %" PRIu64 " exceeds capacity %" PRIu64, opt_size, capacity * 512);
  if (disk_bytes < (uint64_t)opt_bs) die(2, "disk size unknown or too small (give --size)");

  // queue size: room for qd chains of `stride` descriptors
  int stride = use_indirect ? 1 : nseg + 2;
  int qsize = opt_qsize;
  if (!qsize) { qsize = 256; while (qsize < stride * opt_qd) qsize *= 2; }
  if (qsize & (qsize - 1) || qsize > 32768 || stride * opt_qd > qsize) die(2, "queue size %d cannot hold qd %d x %d descriptors", qsize, opt_qd, stride);

  // guest memory: NREG memfd regions, each at least --mem-mb and big enough for what we place there
  uint64_t per_q = 3 * 4096 + 16ull * qsize + 8ull * qsize + 4096 + (uint64_t)opt_qd * (opt_bs + 4096 + 64 + 16ull * (nseg + 2));
  uint64_t need = per_q * opt_queues; // generous upper bound per region
  uint64_t each = opt_mem_mb << 20;
  if (each < need) each = (need + (2 << 20) - 1) & ~((2ull << 20) - 1);
  mem_init(each);

  struct { uint32_t nregions, padding; struct { uint64_t gpa, size, uva, off; } r[8]; } mt = { NREG, 0, { { 0 } } };
  int fds[NREG];
  for (int i = 0; i < NREG; i++) {
    mt.r[i].gpa = regs[i].gpa; mt.r[i].size = regs[i].size; mt.r[i].uva = regs[i].uva; mt.r[i].off = 0;
    fds[i] = regs[i].fd;
  }
  vu_set(SET_MEM_TABLE, &mt, 8 + 32 * NREG, fds, NREG, 1);

  if (opt_log) {
    // QEMU's vhost_dev_set_log: a shared bitmap (1 bit per 4 KiB page) covering all guest memory.
    uint64_t top = 0;
    for (int i = 0; i < NREG; i++) if (regs[i].gpa + regs[i].size > top) top = regs[i].gpa + regs[i].size;
    uint64_t log_bytes = ((top / 4096 + 63) / 64) * 8;
    int lfd = memfd_create("loadgen-dirty-log", MFD_CLOEXEC);
    if (lfd < 0 || ftruncate(lfd, (off_t)log_bytes) < 0) die(2, "dirty log memfd: %s", strerror(errno));
    struct { uint64_t size, offset; } lb = { log_bytes, 0 };
    uint64_t r = 0;
    vu_send(SET_LOG_BASE, 0, &lb, sizeof lb, &lfd, 1);
    vu_recv(SET_LOG_BASE, &r, 8);
    close(lfd);
  }

  queues = calloc(opt_queues, sizeof *queues);
  for (int qi = 0; qi < opt_queues; qi++) {
    struct queue *q = &queues[qi];
    q->index = qi;
    q->qsize = (uint16_t)qsize;
    q->stride = (uint16_t)stride;
    setup_queue_memory(q);
    q->kickfd = eventfd(0, EFD_CLOEXEC);
    q->callfd = eventfd(0, EFD_CLOEXEC);
    if (q->kickfd < 0 || q->callfd < 0) die(2, "eventfd: %s", strerror(errno));
    vu_set_state(SET_VRING_NUM, qi, qsize, 0);
    vu_set_state(SET_VRING_BASE, qi, opt_packed ? packed_base(q) : 0, 0); // packed: 0x80008000
    struct { uint32_t index, flags; uint64_t desc, used, avail, log; } va = { (uint32_t)qi, 0, 0, 0, 0, 0 };
    if (opt_packed) { va.desc = uva_of(q->pring); va.avail = uva_of(q->drv_evt); va.used = uva_of(q->dev_evt); }
    else { va.desc = uva_of(q->desc); va.used = uva_of(q->used); va.avail = uva_of(q->avail); }
    if (opt_log) { va.flags = 1; va.log = gpa_of(opt_packed ? (void *)q->dev_evt : (void *)q->used); } // VHOST_VRING_F_LOG
    vu_set(SET_VRING_ADDR, &va, sizeof va, NULL, 0, 0);
    vu_set_u64(SET_VRING_KICK, qi, &q->kickfd, 1, 0);
    vu_set_u64(SET_VRING_CALL, qi, &q->callfd, 1, 0);
    if (features & BIT(F_PROTOCOL_FEATURES)) vu_set_state(SET_VRING_ENABLE, qi, 1, 0);
  }
  // Barrier: a request with a reply, so every message above has been handled before we kick.
  (void)vu_get_u64(GET_FEATURES);
  for (int qi = 0; qi < opt_queues; qi++)
    vlog("queue %d: kick fd O_NONBLOCK=%d call fd O_NONBLOCK=%d (set by the back-end if 1)\n", qi,
         !!(fcntl(queues[qi].kickfd, F_GETFL) & O_NONBLOCK), !!(fcntl(queues[qi].callfd, F_GETFL) & O_NONBLOCK));
  vlog("setup done: features=0x%" PRIx64 " proto=0x%" PRIx64 " disk=%" PRIu64 " qsize=%d indirect=%d event_idx=%d packed=%d\n",
       features, proto_features, disk_bytes, qsize, use_indirect, event_idx, opt_packed);

  if (opt_ready) { fprintf(stderr, "loadgen: ready\n"); fflush(stderr); }
  if (opt_hold) {
    int sig = 0;
    sigwait(&held, &sig);
    if (sig != SIGUSR1) sig_stop = 1;
    sigset_t stops;
    sigemptyset(&stops);
    sigaddset(&stops, SIGINT);
    sigaddset(&stops, SIGTERM);
    sigprocmask(SIG_UNBLOCK, &stops, NULL);
  }

  // --- run ---
  t_start = now_s();
  t_ramp_end_ns = now_ns() + (uint64_t)(opt_ramp * 1e9);
  t_deadline = opt_time > 0 ? t_start + opt_ramp + opt_time : 1e300;
  for (int qi = 0; qi < opt_queues; qi++)
    pthread_create(&queues[qi].thr, NULL, opt_packed ? queue_thread_packed : opt_rate > 0 ? queue_thread_paced : queue_thread, &queues[qi]);

  // watchdog: end of run, stall detection (5 s without progress while requests are in flight)
  uint64_t last_prog[64] = { 0 };
  double last_change[64];
  for (int qi = 0; qi < opt_queues; qi++) last_change[qi] = t_start;
  int stalled = -1;
  double t_stop = 0;
  for (;;) {
    usleep(20000);
    double t = now_s();
    if (!stop_flag && (t >= t_deadline || sig_stop)) { stop_flag = 1; t_stop = t; }
    int all_done = 1;
    for (int qi = 0; qi < opt_queues; qi++) {
      struct queue *q = &queues[qi];
      if (!q->done) all_done = 0;
      // a paced queue may have nothing in flight for a while: only waiting requests can stall
      if (q->progress != last_prog[qi] || q->inflight == 0) { last_prog[qi] = q->progress; last_change[qi] = t; }
      else if (!q->done && t - last_change[qi] > 5.0 && stalled < 0) {
        stalled = qi;
        if (opt_packed) {
          struct pdesc *d = &q->pring[q->p_used];
          fprintf(stderr,
                  "loadgen: STALL queue %d (packed): no completion for 5 s; inflight=%d avail=%u/wrap%u used=%u/wrap%u "
                  "desc[used]={len %u id %u flags 0x%x} driver_evt={off_wrap 0x%x flags %u} device_evt={off_wrap 0x%x flags %u} "
                  "kicks=%" PRIu64 " ops=%" PRIu64 "\n",
                  qi, q->inflight, q->p_avail, q->p_avail_wrap, q->p_used, q->p_used_wrap, d->len, d->id, d->flags,
                  q->drv_evt->off_wrap, q->drv_evt->flags, q->dev_evt->off_wrap, q->dev_evt->flags, q->kicks, q->ops);
          continue;
        }
        uint16_t ui = __atomic_load_n(used_idx_p(q), __ATOMIC_ACQUIRE);
        fprintf(stderr,
                "loadgen: STALL queue %d: no completion for 5 s; inflight=%d avail_idx=%u used_idx=%u "
                "last_used=%u avail_event=%u used_event=%u used_flags=0x%x kicks=%" PRIu64 " ops=%" PRIu64 "\n",
                qi, q->inflight, q->avail_idx, ui, q->last_used, *avail_event_p(q), *used_event_p(q),
                *(uint16_t *)q->used, q->kicks, q->ops);
      }
    }
    if (all_done) break;
    if (stalled >= 0) {
      abort_flag = 1;
      for (int qi = 0; qi < opt_queues; qi++) { uint64_t one = 1; if (write(queues[qi].callfd, &one, 8) < 0) {} }
      int alive = 0;
      for (int qi = 0; qi < opt_queues; qi++) alive |= !queues[qi].done;
      if (!alive) break;
    }
  }
  double t_end = now_s();
  for (int qi = 0; qi < opt_queues; qi++) pthread_join(queues[qi].thr, NULL);

  // --- teardown: GET_VRING_BASE each ring (back-end must drain and stop it) ---
  int base_mismatch = 0;
  if (stalled < 0) {
    for (int qi = 0; qi < opt_queues; qi++) {
      struct vring_state s = { (uint32_t)qi, 0 };
      vu_send(GET_VRING_BASE, 0, &s, sizeof s, NULL, 0);
      vu_recv(GET_VRING_BASE, &s, sizeof s);
      if (opt_packed) {
        uint32_t want = packed_base(&queues[qi]);
        if (s.index != (uint32_t)qi || s.num != want) {
          fprintf(stderr, "loadgen: GET_VRING_BASE(%d) returned index %u num 0x%08x, expected num 0x%08x "
                  "(avail idx | avail wrap << 15 | used idx << 16 | used wrap << 31)\n", qi, s.index, s.num, want);
          base_mismatch++;
        }
      } else if (s.index != (uint32_t)qi || (s.num & 0xffff) != queues[qi].avail_idx) {
        fprintf(stderr, "loadgen: GET_VRING_BASE(%d) returned index %u num %u, expected num %u\n", qi, s.index, s.num,
                queues[qi].avail_idx);
        base_mismatch++;
      }
    }
  }
  close(sock);

  // --- results ---
  uint64_t ops = 0, errors = 0, bytes = 0, kicks = 0, sleeps = 0, lenmm = 0, lat_sum = 0, lat_max = 0;
  static uint64_t hist[HBUCKETS];
  for (int qi = 0; qi < opt_queues; qi++) {
    struct queue *q = &queues[qi];
    ops += q->ops; errors += q->errors; bytes += q->bytes; kicks += q->kicks; sleeps += q->sleeps; lenmm += q->len_mismatch; lat_sum += q->lat_sum;
    if (q->lat_max > lat_max) lat_max = q->lat_max;
    for (int b = 0; b < HBUCKETS; b++) hist[b] += q->hist[b];
  }
  double measured_end = t_stop ? t_stop : t_end;
  double seconds = measured_end - (t_start + opt_ramp);
  if (seconds <= 0) seconds = 1e-9;
  printf("{\"iops\":%.0f,\"mbps\":%.2f,\"p50_us\":%.2f,\"p99_us\":%.2f,\"p999_us\":%.2f,\"mean_us\":%.2f,\"max_us\":%.1f,\"errors\":%" PRIu64
         ",\"ops\":%" PRIu64 ",\"seconds\":%.3f,\"kicks\":%" PRIu64 ",\"sleeps\":%" PRIu64 ",\"len_mismatch\":%" PRIu64
         ",\"vring_base_mismatch\":%d,\"stalled_queue\":%d,\"queues\":%d,\"qd\":%d,\"bs\":%d,\"rw\":\"%s\",\"wait\":\"%s\","
         "\"indirect\":%d,\"event_idx\":%d,\"packed\":%s,\"qsize\":%d,\"disk_bytes\":%" PRIu64 ",\"rate\":%g",
         ops / seconds, bytes / seconds / 1e6, hist_pct(hist, ops, 0.50) / 1e3, hist_pct(hist, ops, 0.99) / 1e3,
         hist_pct(hist, ops, 0.999) / 1e3, ops ? lat_sum / 1e3 / ops : 0.0, lat_max / 1e3, errors, ops, seconds, kicks, sleeps, lenmm, base_mismatch, stalled, opt_queues,
         opt_qd, opt_bs, opt_rw, opt_wait_spin ? "spin" : "eventfd", use_indirect, event_idx, opt_packed ? "true" : "false", qsize,
         disk_bytes, opt_rate);
  if (opt_hist) {
    printf(",\"hist\":[");
    int first = 1;
    for (int b = 0; b < HBUCKETS; b++)
      if (hist[b]) { printf("%s[%.1f,%" PRIu64 "]", first ? "" : ",", hist_value(b), hist[b]); first = 0; }
    printf("]");
  }
  printf("}\n");
  fflush(stdout);
  return stalled >= 0 ? 3 : 0;
}
