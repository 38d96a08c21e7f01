#!/bin/sh
# Data-integrity smoke test of /dev/vda, run inside the e2e guest.
#
# Disk layout used (the disk must be >= 176 MiB):
#     0 ..  96 MiB  fio randwrite+verify, 2 jobs x 48 MiB (one per job, so
#                   both virtqueues carry I/O when the device has 2 queues)
#    64 MiB         4 KiB marker block written last (host checks it)
#   128 .. 144 MiB  written, then discarded with blkdiscard
#   160 .. 164 MiB  sequential write with fsync after every write (flush)
#
# Output lines the host parses:
#   VUBD-HWQUEUES n=<n>   VUBD-SECTORS n=<n>   VUBD-DISCARD-MAX bytes=<n>
#   VUBD-FIO <phase> ...  (fio's IOPS/BW summary lines)
#   VUBD-DISCARD ok|unsupported|failed   VUBD-FLUSH ok|failed
#   VUBD-MARKER ok offset=<bytes> len=4096
#   VUBD-STEP-FAIL <what>  on any failure; the script's exit code is non-zero then.
DEV=/dev/vda
FIO_SIZE=48M
FIO_JOBS=2
rc=0
fail() { echo "VUBD-STEP-FAIL $*"; rc=1; }

ENGINE=psync
if fio --enghelp 2>/dev/null | grep -qw libaio; then ENGINE=libaio; fi

echo "VUBD-SECTORS n=$(cat /sys/block/vda/size)"
echo "VUBD-LOGICAL-BLOCK bytes=$(cat /sys/block/vda/queue/logical_block_size)"
echo "VUBD-DISCARD-MAX bytes=$(cat /sys/block/vda/queue/discard_max_bytes)"
echo "VUBD-WRITE-CACHE mode=$(cat /sys/block/vda/queue/write_cache 2>/dev/null | tr ' ' '_')"
echo "VUBD-READONLY ro=$(cat /sys/block/vda/ro)"
echo "VUBD-MQ dirs=$(ls /sys/block/vda/mq | tr '\n' ' ')"
echo "VUBD-HWQUEUES n=$(ls /sys/block/vda/mq | wc -l)"
echo "VUBD-ENGINE $ENGINE"

# run_fio PHASE fio-args...: run fio, echo its log, print summary lines, check errors.
run_fio() {
  phase=$1; shift
  fio --output-format=normal "$@" >/tmp/fio-$phase.log 2>&1
  frc=$?
  cat /tmp/fio-$phase.log
  grep -E '(read|write|trim): IOPS=' /tmp/fio-$phase.log | sed "s/^ */VUBD-FIO $phase /"
  if [ $frc -ne 0 ]; then fail "fio $phase exited $frc"; fi
  if grep -qiE 'verify failed|bad magic|bad header|verify: bad|crc32c: verify|io_u error|Input/output error' /tmp/fio-$phase.log; then
    fail "fio $phase reported verify/io errors"
  fi
}

COMMON="--filename=$DEV --direct=1 --ioengine=$ENGINE --iodepth=8 --bs=4k --size=$FIO_SIZE --numjobs=$FIO_JOBS --offset_increment=$FIO_SIZE --group_reporting --randrepeat=1 --verify=crc32c --verify_fatal=1 --verify_dump=0"

echo "== phase write: randwrite + verify"
run_fio write --name=vubd-rw --rw=randwrite --do_verify=1 $COMMON

echo "== phase readback: re-read and verify what was written"
run_fio readback --name=vubd-rw --rw=randwrite --verify_only=1 $COMMON

echo "== phase discard: 128 MiB + 16 MiB"
dd if=/dev/zero bs=1M count=16 2>/dev/null | tr '\000' 'D' | dd of=$DEV bs=1M seek=128 oflag=direct 2>/dev/null \
  || fail "pre-discard write"
if [ "$(cat /sys/block/vda/queue/discard_max_bytes)" = "0" ]; then
  echo "VUBD-DISCARD unsupported"
elif blkdiscard -o $((128 * 1024 * 1024)) -l $((16 * 1024 * 1024)) $DEV; then
  echo "VUBD-DISCARD ok"
else
  echo "VUBD-DISCARD failed"; fail "blkdiscard"
fi

echo "== phase flush: write with fsync=1"
run_fio flush --name=vubd-flush --filename=$DEV --rw=write --bs=64k --offset=160M --size=4M \
  --ioengine=psync --fsync=1 --verify=crc32c --do_verify=1 --verify_fatal=1
sync
blockdev --flushbufs $DEV || fail "blockdev --flushbufs"
echo "VUBD-FLUSH $( [ $rc -eq 0 ] && echo ok || echo failed)"

echo "== phase marker: 4 KiB at 64 MiB"
i=0
while [ $i -lt 128 ]; do printf 'VUBD-MARKER-%019d\n' $i; i=$((i + 1)); done > /tmp/marker
dd if=/tmp/marker of=$DEV bs=4096 seek=16384 count=1 oflag=direct conv=notrunc,fsync 2>/dev/null || fail "marker write"
sync
dd if=$DEV bs=4096 skip=16384 count=1 iflag=direct 2>/dev/null > /tmp/marker.back || fail "marker read"
if cmp -s /tmp/marker /tmp/marker.back; then
  echo "VUBD-MARKER ok offset=$((64 * 1024 * 1024)) len=4096"
else
  fail "marker read-back mismatch"
fi
blockdev --flushbufs $DEV

echo "VUBD-FIO-VERIFY rc=$rc"
exit $rc
