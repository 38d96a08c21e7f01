#!/bin/sh
# Guest side of test/e2e/libvirt.test.ts (a libvirt domain on vhostuser disks):
# I/O on vda; waits for a hot-plugged vdb, I/O on it, waits until it is
# unplugged; then waits for the ACPI power button (virsh shutdown), seen by
# busybox acpid. Each step prints a "VUBD-LV <step>" line the host waits for.
step() { echo "VUBD-LV $*"; }
fail() { echo "VUBD-STEP-FAIL $*"; exit 1; }

# Wait up to $2 seconds for the command $1 to succeed.
wait_for() {
  i=0
  while ! eval "$1"; do
    [ $i -ge $(($2 * 10)) ] && return 1
    usleep 100000
    i=$((i + 1))
  done
}

# 1 MiB of "VUBD-LIBVIRT-<dev>\n" lines at offset 1 MiB, written, read back
# past the page cache (O_DIRECT) and compared; the host checks the image.
rw_check() {
  dev=$1
  yes "VUBD-LIBVIRT-$dev" | head -c 1048576 > "/tmp/w.$dev"
  dd if="/tmp/w.$dev" of="/dev/$dev" bs=65536 seek=16 oflag=direct conv=fsync 2>/dev/null || fail "write /dev/$dev"
  dd if="/dev/$dev" of="/tmp/r.$dev" bs=65536 skip=16 count=16 iflag=direct 2>/dev/null || fail "read /dev/$dev"
  cmp "/tmp/w.$dev" "/tmp/r.$dev" || fail "/dev/$dev read back differs"
  step "$dev-io ok sectors=$(cat /sys/block/$dev/size)"
}

# The power button is an input event (button + evdev modules); acpid runs
# /etc/acpi/<action>/00000080 for it. PWRF and PWRB: the name depends on the firmware.
mkdir -p /etc/acpi/PWRF /etc/acpi/PWRB
for d in PWRF PWRB; do
  printf '#!/bin/sh\ntouch /tmp/power-button\n' > "/etc/acpi/$d/00000080"
  chmod 755 "/etc/acpi/$d/00000080"
done
ls /dev/input/event* >/dev/null 2>&1 || fail "no /dev/input/event* (button/evdev modules)"
acpid -c /etc/acpi -l /tmp/acpid.log || fail "acpid did not start"

rw_check vda
step "waiting-vdb"
wait_for '[ -b /dev/vdb ]' 180 || fail "hot-plugged vdb did not appear"
rw_check vdb
step "waiting-vdb-gone"
wait_for '[ ! -e /sys/block/vdb ]' 180 || fail "vdb still present after detach"
step "vdb-gone"
step "waiting-power-button"
wait_for '[ -e /tmp/power-button ]' 180 || fail "no ACPI power button event"
step "power-button"
exit 0
