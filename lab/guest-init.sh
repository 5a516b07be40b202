#!/bin/busybox sh
# /init of the lab guest. Kernel command line knobs:
#   vmb.burn=N      start N busy loops (CPU burners)
#   vmb.fill=MiB    fill a tmpfs with MiB of data (memory pressure)
#   vmb.fillstep=MiB/s  fill gradually, this many MiB per second (default: all at once)
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_balloon; do
  insmod /lib/modules/$m.ko 2>/dev/null
done
burn=0; fill=0; step=0
for a in $(cat /proc/cmdline); do
  case "$a" in
    vmb.burn=*) burn=${a#vmb.burn=} ;;
    vmb.fill=*) fill=${a#vmb.fill=} ;;
    vmb.fillstep=*) step=${a#vmb.fillstep=} ;;
  esac
done
i=0
while [ "$i" -lt "$burn" ]; do
  (while :; do :; done) &
  i=$((i + 1))
done
if [ "$fill" -gt 0 ]; then
  mount -t tmpfs -o size=100% tmpfs /mnt
  if [ "$step" -gt 0 ]; then
    (n=0; while [ "$n" -lt "$fill" ]; do dd if=/dev/zero of=/mnt/f$n bs=1M count=$step 2>/dev/null; n=$((n + step)); sleep 1; done) &
  else
    dd if=/dev/zero of=/mnt/fill bs=1M count="$fill" 2>/dev/null
  fi
fi
echo "vmb-guest-ready burn=$burn fill=$fill"
while :; do sleep 3600; done
