#!/usr/bin/env bash
# Developer tool: boot the e2e guest against qemu-storage-daemon (the reference
# vhost-user-blk backend), to compare its behaviour/numbers with vubd's.
#
#   scripts/guest/run-qsd.sh [-q NUM_QUEUES] [-t TEST|-t ''] [-i IMAGE] [-s SIZE]
#
#   -q N      virtqueues (QSD and QEMU both get N; QSD refuses more on the QEMU side)  [2]
#   -t TEST   guest test from scripts/guest/tests/ (fio-verify, size); '' = shell     [fio-verify]
#   -i IMAGE  raw image to export (created sparse if missing)        [/tmp/vubd-qsd.img]
#   -s SIZE   size for a newly created image (truncate syntax)       [256M]
#   -d        use the vubd daemon (dist/src/cli/main.js) instead of QSD
#   -c MODE   cache mode: writeback (default) or none (O_DIRECT: QSD cache.direct=on,aio=io_uring; vubd --cache=none)
#
# The shell mode (-t '') gives a busybox shell on the console; Ctrl-A X quits QEMU.
# Always TCG: the nested /dev/kvm on our machines hangs guests.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
Q=2 TEST=fio-verify IMG=/tmp/vubd-qsd.img SIZE=256M BACKEND=qsd CACHE=writeback
while getopts "q:t:i:s:c:dh" o; do
  case "$o" in
    q) Q="$OPTARG" ;; t) TEST="$OPTARG" ;; i) IMG="$OPTARG" ;; s) SIZE="$OPTARG" ;;
    d) BACKEND=vubd ;; c) CACHE="$OPTARG" ;;
    *) sed -n '2,17p' "$0"; exit 2 ;;
  esac
done

"$HERE/build.sh"
OUT="${VUBD_GUEST_OUT:-$HERE/out}"
[[ -e "$IMG" ]] || truncate -s "$SIZE" "$IMG"
SOCK="$(mktemp -u /tmp/vubd-qsd.XXXXXX.sock)"

if [[ "$BACKEND" == qsd ]]; then
  qemu-storage-daemon \
    --blockdev "driver=file,node-name=f0,filename=$IMG$([[ $CACHE == none ]] && echo ,cache.direct=on,aio=io_uring)" \
    --export "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=$Q" \
    2> >(sed 's/^/[qsd] /' >&2) &
else
  node "$ROOT/dist/src/cli/main.js" --socket-path="$SOCK" --blk-file="$IMG" --num-queues="$Q" --cache="$CACHE" --log-level=info \
    2> >(sed 's/^/[vubd] /' >&2) &
fi
DPID=$!
cleanup() { kill "$DPID" 2>/dev/null || true; wait "$DPID" 2>/dev/null || true; rm -f "$SOCK"; }
trap cleanup EXIT
for _ in $(seq 100); do [[ -S "$SOCK" ]] && break; kill -0 "$DPID" 2>/dev/null || { echo "backend died" >&2; exit 1; }; sleep 0.1; done
[[ -S "$SOCK" ]] || { echo "backend did not create $SOCK" >&2; exit 1; }

APPEND="console=ttyS0 quiet panic=-1"
SERIAL=stdio
if [[ -n "$TEST" ]]; then APPEND="$APPEND vubd.test=$TEST"; else SERIAL=mon:stdio; fi
START=$(date +%s.%N)
set +e
qemu-system-x86_64 -accel tcg -machine pc -m 512M -smp "$(( Q > 2 ? Q : 2 ))" \
  -nodefaults -no-user-config -display none -serial "$SERIAL" -no-reboot \
  -kernel "$OUT/vmlinuz" -initrd "$OUT/initramfs.cpio.gz" -append "$APPEND" \
  -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
  -chardev "socket,id=vub0,path=$SOCK" \
  -device "vhost-user-blk-pci,chardev=vub0,num-queues=$Q"
RC=$?
set -e
echo "[run-qsd] qemu exit $RC after $(echo "$(date +%s.%N) - $START" | bc 2>/dev/null || echo '?') s; image: $IMG" >&2
if [[ "$TEST" == fio-verify ]]; then
  printf '[run-qsd] marker at 64 MiB: '; dd if="$IMG" bs=4096 skip=16384 count=1 2>/dev/null | head -c 31; echo
fi
