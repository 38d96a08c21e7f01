#!/bin/sh
# Live migration seen from inside the e2e guest: fio keeps writing and
# verifying /dev/vda in passes while the host migrates the VM to a second QEMU
# (or cancels, or loses the destination); test/e2e/guest-migrate.test.ts
# drives the host side.
#
# Disk layout (the disk must be >= 128 MiB):
#     0 ..  16 MiB  "live": fio randwrite + verify, 2 jobs x 8 MiB, in a loop;
#                   each pass has its own verify_pattern, so stale data from an
#                   older pass fails
#    64 MiB         4 KiB marker (as fio-verify.sh), written at the end
#    96 MiB         4 KiB flag block, written by the HOST when its part is
#                   over (migration completed, cancelled or failed): the guest
#                   reads it between passes, runs one more pass, verifies
#                   everything and writes the marker
#
# Lines the host parses:
#   VUBD-MIG-PASS iter=<i> pattern=<p> up=<s>   (one per pass, before fio)
#   VUBD-MIG-FLAG seen iter=<i>   VUBD-MIG-LAST pattern=<p> iterations=<n>
#   VUBD-FIO <phase> <fio summary>   VUBD-MARKER ok offset=<bytes> len=4096
#   VUBD-STEP-FAIL <what> on any failure; the exit code is non-zero then.
DEV=/dev/vda
FLAG_TIMEOUT_S=300 # the host writes the flag within ~1-2 min under TCG
MIB=1048576
FLAG_TEXT=VUBD-MIG-HOST-DONE
rc=0
fail() { echo "VUBD-STEP-FAIL $*"; rc=1; }

ENGINE=psync
if fio --enghelp 2>/dev/null | grep -qw libaio; then ENGINE=libaio; fi

echo "VUBD-SECTORS n=$(cat /sys/block/vda/size)"
echo "VUBD-HWQUEUES n=$(ls /sys/block/vda/mq | wc -l)"
echo "VUBD-ENGINE $ENGINE"

# run_fio PHASE fio-args...: summary lines always, the whole log only on failure.
run_fio() {
  phase=$1; shift
  fio --output-format=normal "$@" >/tmp/fio-$phase.log 2>&1
  frc=$?
  grep -E '(read|write): IOPS=' /tmp/fio-$phase.log | sed "s/^ */VUBD-FIO $phase /"
  bad=0
  if [ $frc -ne 0 ]; then fail "fio $phase exited $frc"; bad=1; fi
  if grep -qiE 'verify failed|bad magic|bad header|verify: bad|crc32c: verify|got pattern|bad pattern|io_u error|Input/output error' /tmp/fio-$phase.log; then
    fail "fio $phase reported verify/io errors"; bad=1
  fi
  [ $bad -eq 0 ] || cat /tmp/fio-$phase.log
  return $bad
}

flag_set() {
  dd if=$DEV bs=4096 skip=$((96 * 256)) count=1 iflag=direct 2>/dev/null | grep -q "$FLAG_TEXT"
}

LIVE="--name=live --filename=$DEV --direct=1 --ioengine=$ENGINE --iodepth=8 --bs=4k --numjobs=2 --group_reporting --randrepeat=1 --verify_fatal=1 --verify_dump=0 --rw=randwrite --offset=0 --size=8M --offset_increment=8M --verify=meta"

# verify_backlog interleaves the verify reads with the writes: every pass
# writes and reads (IN data the backend puts in guest RAM) from start to end.
live_pass() { # live_pass ITER: one pass with its own pattern; sets $last on success
  pat=$(printf '0x5eed%04x' $1)
  echo "VUBD-MIG-PASS iter=$1 pattern=$pat up=$(cut -d' ' -f1 /proc/uptime)"
  run_fio live $LIVE --do_verify=1 --verify_backlog=512 --verify_pattern=$pat && last=$pat
}

echo "== phase live: verify-writes until the host sets the flag"
i=0
last=""
start=$(date +%s)
while [ $rc -eq 0 ] && ! flag_set; do
  if [ $(( $(date +%s) - start )) -ge "$FLAG_TIMEOUT_S" ]; then
    fail "host flag not set within $FLAG_TIMEOUT_S s"
    break
  fi
  live_pass $i
  i=$((i + 1))
done
echo "VUBD-MIG-FLAG seen iter=$i up=$(cut -d' ' -f1 /proc/uptime)"
# One more pass, wholly after the host's part (on whichever QEMU runs the guest now).
[ $rc -ne 0 ] || { live_pass $i; i=$((i + 1)); }
echo "VUBD-MIG-LAST pattern=$last iterations=$i"
[ -n "$last" ] || fail "no live pass completed"

echo "== phase final: re-read and verify the last pattern everywhere"
[ -z "$last" ] || run_fio final $LIVE --verify_only=1 --verify_pattern=$last

echo "== phase marker: 4 KiB at 64 MiB"
j=0
while [ $j -lt 128 ]; do printf 'VUBD-MARKER-%019d\n' $j; j=$((j + 1)); done > /tmp/marker
dd if=/tmp/marker of=$DEV bs=4096 seek=16384 count=1 oflag=direct conv=notrunc,fsync 2>/dev/null || fail "marker write"
dd if=$DEV bs=4096 skip=16384 count=1 iflag=direct 2>/dev/null > /tmp/marker.back || fail "marker read"
if cmp -s /tmp/marker /tmp/marker.back; then
  echo "VUBD-MARKER ok offset=$((64 * MIB)) len=4096"
else
  fail "marker read-back mismatch"
fi
sync
blockdev --flushbufs $DEV || fail "blockdev --flushbufs"

echo "VUBD-MIG-GUEST rc=$rc"
exit $rc
