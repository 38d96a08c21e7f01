{
  "variables": {
    "have_rbd%": "<!(sh -c 'test \"$VUBD_NO_RBD\" != 1 && echo \"#include <rbd/librbd.h>\" | ${CC:-cc} -E -x c - >/dev/null 2>&1 && echo 1 || echo 0')"
  },
  "targets": [
    {
      "target_name": "vubd_native",
      "sources": [
        "src/addon.c",
        "src/sockets.c",
        "src/poll.c",
        "src/memory.c",
        "src/mappings.c",
        "src/unowned_buffer.cc",
        "src/eventfd.c",
        "src/uring.c",
        "src/sync_io.c",
        "src/locks.c",
        "src/accounts.c",
        "src/datagram.c",
        "src/rbd.c",
        "src/stream_socket.c"
      ],
      "defines": ["_GNU_SOURCE"],
      "cflags_c": ["-std=gnu11"],
      "cflags": [ "-Wall", "-Wextra", "-Wno-unused-parameter", "-fvisibility=hidden"],
      "conditions": [
        ["have_rbd==1", {
          "defines": ["VUBD_HAVE_RBD"],
          "libraries": ["-lrbd", "-lrados"]
        }]
      ]
    }
  ]
}
