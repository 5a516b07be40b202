#!/usr/bin/env bash
# Sets up a real libvirt lab on a fresh Debian 12 machine, as root, without systemd:
# installs the packages, configures and starts virtlogd + libvirtd, and builds a tiny
# guest (Debian cloud kernel + busybox initramfs) under $VMB_LAB_DIR (default /var/lib/vm-balancer-lab).
# Idempotent: safe to run again; it only starts what is not running.
# Facts behind each step: ../shared/LAB.md (mirrored in README.md, "The lab").
set -euo pipefail

LAB_DIR=${VMB_LAB_DIR:-/var/lib/vm-balancer-lab}
log() { printf 'lab: %s\n' "$*" >&2; }

[ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }

pkgs=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev qemu-system-x86
      busybox-static cpio pkg-config systemd util-linux prometheus)
missing=()
# The package build (lab/package.sh: dpkg-shlibdeps, strip) and its test (man).
pkgs+=(dpkg-dev binutils man-db)
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# libvirt's QEMU driver resolves its default user before reading qemu.conf.
getent group kvm >/dev/null || groupadd -r kvm
getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
getent passwd libvirt-qemu >/dev/null || useradd -r -g libvirt-qemu -s /usr/sbin/nologin libvirt-qemu

conf=/etc/libvirt/qemu.conf
if ! grep -q '^# vm-balancer lab' "$conf" 2>/dev/null; then
  log "configuring $conf"
  cat >>"$conf" <<'CONF'
# vm-balancer lab
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
CONF
fi

mkdir -p /var/log/libvirt /var/lib/libvirt/qemu /run/libvirt /var/cache/libvirt
pgrep -x virtlogd >/dev/null || { log "starting virtlogd"; virtlogd -d; }
if ! pgrep -x libvirtd >/dev/null; then
  log "starting libvirtd"
  libvirtd -d
fi
for _ in $(seq 1 60); do
  virsh -c qemu:///system version >/dev/null 2>&1 && break
  sleep 0.5
done
virsh -c qemu:///system version >/dev/null

# --- the guest image -------------------------------------------------------------------
mkdir -p "$LAB_DIR"
if [ ! -s "$LAB_DIR/vmlinuz" ] || [ ! -s "$LAB_DIR/initrd.img" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  ver=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | sed -n 's/.*Depends: linux-image-\(.*-cloud-amd64\).*/\1/p' | head -n1)
  if [ -z "$ver" ]; then apt-get update -qq; ver=$(apt-cache depends linux-image-cloud-amd64 | sed -n 's/.*Depends: linux-image-\(.*-cloud-amd64\).*/\1/p' | head -n1); fi
  [ -n "$ver" ] || { log "cannot resolve the cloud kernel version"; exit 1; }
  log "building guest image from linux-image-$ver"
  (cd "$work" && apt-get download -qq "linux-image-$ver" >/dev/null)
  dpkg-deb -x "$work"/linux-image-"$ver"_*.deb "$work/k"
  root="$work/root"
  mkdir -p "$root"/{bin,proc,sys,dev,mnt,tmp,lib/modules}
  cp /bin/busybox "$root/bin/busybox"
  for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_balloon; do
    f=$(find "$work/k/lib/modules/$ver" -name "$m.ko*" | head -n1)
    [ -n "$f" ] || { log "module $m not found"; exit 1; }
    case "$f" in
      *.xz) xz -dc "$f" >"$root/lib/modules/$m.ko" ;;
      *.zst) zstd -qdc "$f" >"$root/lib/modules/$m.ko" ;;
      *) cp "$f" "$root/lib/modules/$m.ko" ;;
    esac
  done
  cp "$(dirname "$0")/guest-init.sh" "$root/init"
  chmod +x "$root/init"
  (cd "$root" && find . | cpio -o -H newc --quiet | gzip -1 >"$LAB_DIR/initrd.img.new")
  cp "$work"/k/boot/vmlinuz-"$ver" "$LAB_DIR/vmlinuz.new"
  mv "$LAB_DIR/initrd.img.new" "$LAB_DIR/initrd.img"
  mv "$LAB_DIR/vmlinuz.new" "$LAB_DIR/vmlinuz"
fi
# The init script may change without the kernel changing: rebuild only the initrd then.
if ! cmp -s <(gzip -dc "$LAB_DIR/initrd.img" | cpio -i --to-stdout --quiet init 2>/dev/null) "$(dirname "$0")/guest-init.sh"; then
  log "guest init changed; rebuilding initrd"
  work2=$(mktemp -d)
  (cd "$work2" && gzip -dc "$LAB_DIR/initrd.img" | cpio -id --quiet)
  cp "$(dirname "$0")/guest-init.sh" "$work2/init"; chmod +x "$work2/init"
  (cd "$work2" && find . | cpio -o -H newc --quiet | gzip -1 >"$LAB_DIR/initrd.img")
  rm -rf "$work2"
fi
log "ready: libvirtd up, guest image in $LAB_DIR"
