#!/bin/sh
# Live storage migration seen from inside the e2e guest: fio keeps writing and
# verifying /dev/vda while the host mirrors the disk to a new image and pivots
# (test/e2e/guest-mirror.test.ts drives the host side over QMP).
#
# Disk layout (the disk must be >= 160 MiB; the host grows it afterwards):
#     0 ..  64 MiB  "base": fio randwrite, crc32c, 2 jobs x 32 MiB, written
#                   once before the mirror starts (the mirror's bulk copy)
#   100 MiB         4 KiB marker: VUBD-PRE-PIVOT-… before the mirror,
#                   overwritten with VUBD-POSTPIVOT-… after the pivot
#   128 .. 144 MiB  "live": fio randwrite + verify, 2 jobs x 8 MiB, in a loop
#                   while the host mirrors; each pass has its own
#                   verify_pattern, so stale data from an older pass fails;
#                   one last pass after the resize (= after the pivot)
#   old end + 4 MiB "grown": written + verified after the host's resize
#
# Host <-> guest synchronisation, over the console and the disk size:
#   guest: VUBD-PHASE written            (base + pre-pivot marker on disk)
#   guest: VUBD-LIVE iter=<i> pattern=<p> (one line per live pass)
#   host:  blockdev-mirror, BLOCK_JOB_READY, job-complete, then block_resize
#   guest: sees /sys/block/vda/size change between two live passes,
#          prints VUBD-SIZE sectors=<n>, runs one more live pass, verifies
#          everything (now read from the new image), writes the post-pivot
#          marker.
#
# Other lines: VUBD-SECTORS n=  VUBD-HWQUEUES n=  VUBD-FIO <phase> <fio summary>
#   VUBD-LIVE-LAST pattern=<p> iterations=<n>   VUBD-MARKER <pre|post> ok
#   VUBD-STEP-FAIL <what> on any failure; the exit code is non-zero then.
DEV=/dev/vda
LIVE_TIMEOUT_S=45 # the host resizes ~10 s into the live phase
MIB=1048576
rc=0
fail() { echo "VUBD-STEP-FAIL $*"; rc=1; }

ENGINE=psync
if fio --enghelp 2>/dev/null | grep -qw libaio; then ENGINE=libaio; fi

SECT0=$(cat /sys/block/vda/size)
echo "VUBD-SECTORS n=$SECT0"
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

# marker NAME: 4 KiB = 128 lines "VUBD-<NAME>-%016d\n" (NAME is 9 characters).
marker() {
  j=0
  while [ $j -lt 128 ]; do printf 'VUBD-%s-%016d\n' "$1" $j; j=$((j + 1)); done
}
# write_marker NAME TAG: write it at 100 MiB (4 KiB block 25600) and read it back.
write_marker() {
  marker "$1" > /tmp/marker
  dd if=/tmp/marker of=$DEV bs=4096 seek=25600 count=1 oflag=direct conv=notrunc,fsync 2>/dev/null || fail "marker $2 write"
  dd if=$DEV bs=4096 skip=25600 count=1 iflag=direct 2>/dev/null > /tmp/marker.back || fail "marker $2 read"
  if cmp -s /tmp/marker /tmp/marker.back; then echo "VUBD-MARKER $2 ok offset=$((100 * MIB)) len=4096"; else fail "marker $2 read-back mismatch"; fi
}

COMMON="--filename=$DEV --direct=1 --ioengine=$ENGINE --iodepth=8 --bs=4k --numjobs=2 --group_reporting --randrepeat=1 --verify_fatal=1 --verify_dump=0"
BASE="--name=base --rw=randwrite --offset=0 --size=32M --offset_increment=32M --verify=crc32c $COMMON"
LIVE="--name=live --rw=randwrite --offset=128M --size=8M --offset_increment=8M --verify=meta $COMMON"

echo "== phase base: write the verify pattern (checked after the pivot)"
run_fio base $BASE --do_verify=0
write_marker PRE-PIVOT pre
sync
echo "VUBD-PHASE written rc=$rc"

echo "== phase live: verify-writes until the host resizes the disk"
# verify_backlog interleaves the verify reads with the writes, so every pass
# keeps writing from start to end (no long read-only tail).
live_pass() { # live_pass ITER: one pass with its own pattern; sets $last on success
  pat=$(printf '0x5eed%04x' $1)
  echo "VUBD-LIVE iter=$1 pattern=$pat up=$(cut -d' ' -f1 /proc/uptime)"
  run_fio live $LIVE --do_verify=1 --verify_backlog=512 --verify_pattern=$pat && last=$pat
}
i=0
last=""
start=$(date +%s)
while [ $rc -eq 0 ] && [ "$(cat /sys/block/vda/size)" = "$SECT0" ]; do
  if [ $(( $(date +%s) - start )) -ge "$LIVE_TIMEOUT_S" ]; then
    fail "disk size did not change within $LIVE_TIMEOUT_S s"
    break
  fi
  live_pass $i
  i=$((i + 1))
done
SECT1=$(cat /sys/block/vda/size)
echo "VUBD-SIZE sectors=$SECT1 up=$(cut -d' ' -f1 /proc/uptime)"
# One more pass, wholly after the resize and so after the pivot: its pattern
# must be in the new image everywhere and nowhere in the old one.
[ $rc -ne 0 ] || { live_pass $i; i=$((i + 1)); }
echo "VUBD-LIVE-LAST pattern=$last iterations=$i"
[ -n "$last" ] || fail "no live pass completed"
[ "$SECT1" -gt "$SECT0" ] || fail "disk did not grow ($SECT0 -> $SECT1 sectors)"

echo "== phase final: re-read and verify everything (the export now reads the new image)"
run_fio final-base $BASE --verify_only=1
[ -z "$last" ] || run_fio final-live $LIVE --verify_only=1 --verify_pattern=$last
if [ "$SECT1" -gt "$SECT0" ]; then
  echo "== phase grown: 4 MiB past the old end"
  run_fio grown --name=grown --filename=$DEV --direct=1 --ioengine=$ENGINE --iodepth=8 --bs=4k \
    --rw=write --offset=$((SECT0 * 512)) --size=4M --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_dump=0
fi
write_marker POSTPIVOT post
sync
blockdev --flushbufs $DEV || fail "blockdev --flushbufs"

echo "VUBD-MIRROR-GUEST rc=$rc"
exit $rc
