#!/usr/bin/env bash
# Demo on a fresh Debian 12 machine, as root: sets up the lab, starts three tiny guests
# (two with busy vCPUs, one idle with 1 GiB), piles every busy vCPU on host cpu 0, shows
# `vm-balancer diagnose` before, runs the agent for 20 s, and shows the state after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash lab/setup.sh
cargo build --release --locked --quiet
VMB=./target/release/vm-balancer
LAB=${VMB_LAB_DIR:-/var/lib/vm-balancer-lab}
tmp=$(mktemp -d)
names=(demo-web demo-batch demo-idle)
cleanup() { for n in "${names[@]}"; do virsh -c qemu:///system destroy "$n" >/dev/null 2>&1 || true; done; rm -rf "$tmp"; }
trap cleanup EXIT

guest() { # name vcpus burn memory_mib
  cat >"$tmp/$1.xml" <<XML
<domain type='qemu'>
  <name>$1</name>
  <memory unit='MiB'>$4</memory>
  <vcpu>$2</vcpu>
  <os><type arch='x86_64'>hvm</type><kernel>$LAB/vmlinuz</kernel><initrd>$LAB/initrd.img</initrd>
    <cmdline>console=ttyS0 quiet vmb.burn=$3</cmdline></os>
  <features><acpi/><apic/></features>
  <devices>
    <serial type='file'><source path='$tmp/$1.log'/></serial>
    <memballoon model='virtio'><stats period='1'/></memballoon>
  </devices>
</domain>
XML
  virsh -c qemu:///system create "$tmp/$1.xml" >/dev/null
}
guest demo-web 1 1 256
guest demo-batch 1 1 256
guest demo-idle 1 0 1024
for n in "${names[@]}"; do
  until grep -q vmb-guest-ready "$tmp/$n.log" 2>/dev/null; do sleep 0.5; done
done
echo "== piling every vCPU on host cpu 0"
for n in "${names[@]}"; do virsh -c qemu:///system vcpupin "$n" 0 0 --live >/dev/null; done
sleep 2
echo "== BEFORE: vm-balancer diagnose"
$VMB diagnose --min-age 1s
echo
echo "== running the agent for 20 s"
timeout -s TERM 20 $VMB run --quantum 1s --min-age 1s --mem-interval 2s --mem-cooldown 3s || true
echo
echo "== AFTER: vm-balancer diagnose"
$VMB diagnose --min-age 1s
echo
for n in "${names[@]}"; do
  printf '%-12s vCPU 0 on cpu %s, balloon %s KiB\n' "$n" \
    "$(virsh -c qemu:///system vcpupin "$n" | awk '$1=="0"{print $2}')" \
    "$(virsh -c qemu:///system domstats --balloon "$n" | sed -n 's/.*balloon.current=//p')"
done
