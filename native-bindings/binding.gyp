{
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
        "src/datagram.c"
      ],
      "defines": ["_GNU_SOURCE"],
      "cflags_c": ["-std=gnu11"],
      "cflags": [ "-Wall", "-Wextra", "-Wno-unused-parameter", "-fvisibility=hidden"]
    }
  ]
}
