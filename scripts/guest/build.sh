#!/usr/bin/env bash
# Build the vubd e2e guest: a Debian 12 kernel plus a tiny initramfs
# (busybox-static + Debian's fio with its shared libraries + the virtio-pci /
# virtio-blk modules + /init + the test scripts in scripts/guest/tests/).
#
#   scripts/guest/build.sh [OUTDIR]        (default OUTDIR: scripts/guest/out)
#
# Outputs: OUTDIR/vmlinuz, OUTDIR/initramfs.cpio.gz, OUTDIR/kernel-version,
#          OUTDIR/.stamp (hash of the inputs; a matching stamp => nothing to do).
# Set VUBD_GUEST_REBUILD=1 to force a rebuild; VUBD_KERNEL_DEB=/path/to.deb to
# use a local linux-image-*.deb instead of `apt-get download`.
#
# Needs (Debian packages): busybox-static, fio, apt (apt-get download), gzip.
# Cost, measured on the 2-core Debian 12 dev box: ~9 s for a cold build (the
# kernel .deb is ~70 MB: <1 s download from the mirror, ~2 s to extract the
# few files needed, ~5 s to gzip the initramfs), ~0.05 s when cached.
# Output ~41 MB: vmlinuz 8 MB + initramfs.cpio.gz 34 MB (mostly the shared
# libraries Debian's fio links: ceph, gluster, ICU...).
# The stamp does not track the kernel package version (no network needed for
# a cache hit); VUBD_GUEST_REBUILD=1 picks up a newer Debian kernel.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUTDIR="${1:-$HERE/out}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"

log() { echo "[guest-build] $*" >&2; }
die() { echo "[guest-build] ERROR: $*" >&2; exit 1; }

for tool in busybox fio gzip dpkg apt-get ldd sha256sum; do
  command -v "$tool" >/dev/null 2>&1 || die "missing '$tool' (apt-get install busybox-static fio)"
done
BUSYBOX="$(command -v busybox)"
# The guest has no libc for busybox: it must be the static one.
if ldd "$BUSYBOX" >/dev/null 2>&1; then die "$BUSYBOX is dynamically linked; install busybox-static"; fi
FIO="$(command -v fio)"

# button + evdev: the ACPI power button as an input event, for busybox acpid (virsh shutdown)
MODULES_WANTED="virtio_pci virtio_blk button evdev"

# ---- cache check -----------------------------------------------------------
pkgver() { dpkg-query -W -f='${Package}=${Version}' "$1" 2>/dev/null || echo "$1=?"; }
STAMP="$(
  {
    echo "format=1 modules=$MODULES_WANTED"
    pkgver busybox-static; echo; pkgver fio; echo
    echo "kernel-deb=${VUBD_KERNEL_DEB:-apt}"
    cat "$HERE/build.sh" "$HERE/init"
    for f in "$HERE"/tests/*.sh; do echo "== $(basename "$f")"; cat "$f"; done
  } | sha256sum | cut -d' ' -f1
)"
if [[ "${VUBD_GUEST_REBUILD:-0}" != 1 && -s "$OUTDIR/vmlinuz" && -s "$OUTDIR/initramfs.cpio.gz" \
      && -f "$OUTDIR/.stamp" && "$(cat "$OUTDIR/.stamp")" == "$STAMP" ]]; then
  log "up to date: $OUTDIR ($(cat "$OUTDIR/kernel-version" 2>/dev/null || echo '?'))"
  exit 0
fi
rm -f "$OUTDIR/.stamp"

START=$(date +%s)
WORK="$(mktemp -d "${TMPDIR:-/tmp}/vubd-guest-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# ---- kernel ----------------------------------------------------------------
if [[ -n "${VUBD_KERNEL_DEB:-}" ]]; then
  DEB="$VUBD_KERNEL_DEB"
else
  # linux-image-amd64 is a metapackage; its Depends names the real image.
  resolve_kpkg() {
    apt-cache depends linux-image-amd64 2>/dev/null \
      | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n1
  }
  KPKG="$(resolve_kpkg)"
  if [[ -z "$KPKG" && "$(id -u)" == 0 ]]; then
    log "apt lists look empty; running apt-get update"
    apt-get update -qq >&2 || true
    KPKG="$(resolve_kpkg)"
  fi
  [[ -n "$KPKG" ]] || die "cannot resolve linux-image-amd64 (run apt-get update)"
  log "downloading $KPKG"
  chmod 777 "$WORK"   # lets apt's sandbox user write here (avoids a warning)
  (cd "$WORK" && apt-get download -q "$KPKG" >&2) || {
    [[ "$(id -u)" == 0 ]] || die "apt-get download $KPKG failed"
    apt-get update -qq >&2 || true
    (cd "$WORK" && apt-get download -q "$KPKG" >&2) || die "apt-get download $KPKG failed"
  }
  DEB="$(ls "$WORK"/linux-image-*.deb | head -n1)"
fi
log "unpacking $(basename "$DEB")"
# Only /boot and the virtio drivers are needed: extract selectively (fast).
mkdir -p "$WORK/k"
dpkg-deb --fsys-tarfile "$DEB" | tar -x -C "$WORK/k" --wildcards \
  './boot/vmlinuz-*' './boot/config-*' '*/modules.builtin' '*/kernel/drivers/virtio/*' '*/kernel/drivers/block/virtio_blk.ko*' \
  '*/kernel/drivers/acpi/button.ko*' '*/kernel/drivers/input/evdev.ko*' \
  2>/dev/null || dpkg -x "$DEB" "$WORK/k"
VMLINUZ="$(ls "$WORK"/k/boot/vmlinuz-* | head -n1)"
[[ -f "$VMLINUZ" ]] || die "no vmlinuz in $DEB"
KVER="${VMLINUZ##*/vmlinuz-}"
MODDIR=""
for d in "$WORK/k/lib/modules/$KVER" "$WORK/k/usr/lib/modules/$KVER"; do [[ -d "$d" ]] && MODDIR="$d" && break; done
[[ -d "$MODDIR" ]] || die "no modules directory for $KVER"
log "kernel $KVER"

# ---- root filesystem -------------------------------------------------------
R="$WORK/root"
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,usr/lib,usr/lib64,proc,sys,dev,tmp,run,tests,etc}
ln -s usr/lib "$R/lib"        # merged-/usr, like Debian 12
ln -s usr/lib64 "$R/lib64"
cp "$BUSYBOX" "$R/bin/busybox"
for applet in $("$BUSYBOX" --list); do
  [[ "$applet" == busybox ]] || ln -sf busybox "$R/bin/$applet"
done
# Device nodes: only possible as root; /init re-opens /dev/console anyway.
if [[ "$(id -u)" == 0 ]]; then mknod -m 600 "$R/dev/console" c 5 1; mknod -m 666 "$R/dev/null" c 1 3; fi
echo 'root:x:0:0:root:/:/bin/sh' > "$R/etc/passwd"
echo 'root:x:0:' > "$R/etc/group"

# fio + every library ldd lists + the dynamic loader, at the paths ldd prints.
cp "$FIO" "$R/usr/bin/fio"
ldd "$FIO" | awk '/=> \// {print $3} /^[[:space:]]*\/[^ ]*ld-linux/ {print $1}' | sort -u | while read -r lib; do
  mkdir -p "$R$(dirname "$lib")"
  cp -L "$lib" "$R$lib"
done
[[ -e "$R/lib64/ld-linux-x86-64.so.2" ]] || die "dynamic loader not copied"

# Kernel modules: resolve dependencies from each module's .modinfo
# "depends=" (the .deb ships no modules.dep: depmod runs at install time).
mkdir -p "$R/lib/modules/vubd"
find_ko() { find "$MODDIR/kernel" -name "$1.ko" -o -name "$1.ko.xz" -o -name "$1.ko.zst" -o -name "$1.ko.gz" | head -n1; }
ko_plain() { # copy module $1 into the image uncompressed; busybox insmod wants a plain ELF
  local src; src="$(find_ko "$1")"; [[ -n "$src" ]] || die "module $1 not found in $KVER"
  case "$src" in
    *.ko) cp "$src" "$R/lib/modules/vubd/$1.ko" ;;
    *.xz) xz -dc "$src" > "$R/lib/modules/vubd/$1.ko" ;;
    *.zst) zstd -qdc "$src" > "$R/lib/modules/vubd/$1.ko" ;;
    *.gz) gzip -dc "$src" > "$R/lib/modules/vubd/$1.ko" ;;
  esac
}
declare -A SEEN=()
ORDER=()
visit() {
  local m="$1" deps d
  [[ -z "${SEEN[$m]:-}" ]] || return 0
  SEEN[$m]=1
  if grep -qx "$m" <(sed -e 's#.*/##' -e 's/\.ko.*$//' "$MODDIR/modules.builtin" 2>/dev/null); then return 0; fi
  ko_plain "$m"
  deps="$(grep -a -o 'depends=[A-Za-z0-9_,-]*' "$R/lib/modules/vubd/$m.ko" | head -n1 | cut -d= -f2 | tr ',' ' ')"
  for d in $deps; do visit "${d//-/_}"; done
  ORDER+=("$m")
}
for m in $MODULES_WANTED; do visit "$m"; done
printf '%s\n' "${ORDER[@]}" > "$R/lib/modules/vubd/load-order"
log "modules: ${ORDER[*]}"

install -m 755 "$HERE/init" "$R/init"
for t in "$HERE"/tests/*.sh; do install -m 755 "$t" "$R/tests/$(basename "$t")"; done

# ---- pack ------------------------------------------------------------------
(cd "$R" && find . -mindepth 1 | LC_ALL=C sort | "$BUSYBOX" cpio -o -H newc 2>/dev/null) \
  | gzip -6 > "$WORK/initramfs.cpio.gz"
cp "$VMLINUZ" "$OUTDIR/vmlinuz.tmp" && mv "$OUTDIR/vmlinuz.tmp" "$OUTDIR/vmlinuz"
mv "$WORK/initramfs.cpio.gz" "$OUTDIR/initramfs.cpio.gz"
echo "$KVER" > "$OUTDIR/kernel-version"
echo "$STAMP" > "$OUTDIR/.stamp"
log "built in $(( $(date +%s) - START )) s: $(du -sh "$OUTDIR" | cut -f1) in $OUTDIR"
