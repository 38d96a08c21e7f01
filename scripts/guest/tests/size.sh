#!/bin/sh
# Print the size of /dev/vda in 512-byte sectors (resize tests).
echo "VUBD-SIZE sectors=$(cat /sys/block/vda/size)"
