#!/usr/bin/python3
"""A passthrough FUSE file system for tests that need storage misbehaving on purpose.

Mounts BACKING (a directory) on MOUNTPOINT; files are the backing files. Switches:
  --slow-read-ms N         every read() sleeps N ms (storage that is slow to read)
  --slow-while PATH        ... but only while PATH exists
  --fail-fsync-while PATH  fsync() fails with EIO while PATH exists (a target whose flush fails)
  --count-fsyncs PATH      every fsync() that reaches the file system appends one byte to PATH
  --max-write N            a write moves at most N bytes (a short write, which the kernel passes
                           on to the caller as it is with direct_io). Reads are never shortened:
                           a short FUSE read means end of file to the kernel, and io_uring's own
                           retry of it (Linux 6.18) reads the same file offset again into the
                           rest of the buffer, so the caller would get wrong data with full count.
  --punch-zero-writes      a write of only zero bytes punches a hole in the backing file instead
                           (reads the same, and a 1 GiB zeroing costs no disk space)
fallocate() is not implemented, so the kernel answers EOPNOTSUPP (like a file system without it).
Mounted with direct_io: every read and write reaches this process, nothing is served from cache.
Runs in the foreground; unmount with `fusermount3 -u MOUNTPOINT` (or fusermount -u).
"""
import argparse
import ctypes
import errno
import os
import sys
import time

from fusepy import FUSE, FuseOSError, Operations

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class Misbehaving(Operations):
    def __init__(self, backing, args):
        self.backing = backing
        self.args = args

    def _path(self, path):
        return os.path.join(self.backing, path.lstrip('/'))

    def getattr(self, path, fh=None):
        st = os.lstat(self._path(path))
        keys = ('st_mode', 'st_nlink', 'st_uid', 'st_gid', 'st_size', 'st_atime', 'st_mtime', 'st_ctime')
        return {k: getattr(st, k) for k in keys}

    def readdir(self, path, fh):
        return ['.', '..'] + os.listdir(self._path(path))

    def statfs(self, path):
        sv = os.statvfs(self._path(path))
        keys = ('f_bavail', 'f_bfree', 'f_blocks', 'f_bsize', 'f_favail', 'f_ffree', 'f_files', 'f_flag', 'f_frsize', 'f_namemax')
        return {k: getattr(sv, k) for k in keys}

    def open(self, path, flags):
        return os.open(self._path(path), flags & ~os.O_DIRECT)

    def create(self, path, mode, fi=None):
        return os.open(self._path(path), os.O_RDWR | os.O_CREAT, mode)

    def unlink(self, path):
        os.unlink(self._path(path))

    def truncate(self, path, length, fh=None):
        os.truncate(self._path(path), length)

    def read(self, path, size, offset, fh):
        a = self.args
        if a.slow_read_ms > 0 and (a.slow_while is None or os.path.exists(a.slow_while)):
            time.sleep(a.slow_read_ms / 1000)
        return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        if self.args.punch_zero_writes and data.count(0) == len(data):
            if libc.fallocate(fh, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, len(data)) != 0:
                raise FuseOSError(ctypes.get_errno())
            return len(data)
        if self.args.max_write > 0:
            data = data[:self.args.max_write]
        return os.pwrite(fh, data, offset)

    def fsync(self, path, datasync, fh):
        if self.args.count_fsyncs is not None:
            with open(self.args.count_fsyncs, 'ab') as f:
                f.write(b'd' if datasync else b'f')
        if self.args.fail_fsync_while is not None and os.path.exists(self.args.fail_fsync_while):
            raise FuseOSError(errno.EIO)
        os.fsync(fh)
        return 0

    def flush(self, path, fh):
        return 0

    def release(self, path, fh):
        os.close(fh)
        return 0


def main():
    p = argparse.ArgumentParser()
    p.add_argument('backing')
    p.add_argument('mountpoint')
    p.add_argument('--slow-read-ms', type=float, default=0)
    p.add_argument('--slow-while')
    p.add_argument('--fail-fsync-while')
    p.add_argument('--count-fsyncs')
    p.add_argument('--max-write', type=int, default=0)
    p.add_argument('--punch-zero-writes', action='store_true')
    a = p.parse_args()
    FUSE(Misbehaving(os.path.abspath(a.backing), a), a.mountpoint, foreground=True, direct_io=True, big_writes=True, max_write=131072)


if __name__ == '__main__':
    sys.exit(main())
