#!/usr/bin/env bash
# What the agent and libvirtd cost on the lab (docs/design.md, "What the agent and libvirtd
# cost on the lab"): starts N small idle guests (1 vCPU, 128 MiB, balloon statistics every
# second), runs `vm-balancer run --quantum 1s --exclude none [ARGS...]`, and after 20 s of
# discovery and placement prints the CPU time (user + system) the agent used per quantum and
# what it added to libvirtd's, over 90 s. The guests are destroyed at the end.
#
#   bash lab/cost.sh [ARGS...]          # e.g. bash lab/cost.sh --no-memory
#   N=60 SETTLE=20 MEASURE=90 IDLE=30 bash lab/cost.sh   # the defaults
#
# Needs the lab (bash lab/setup.sh) and a release build (cargo build --release). Not part of
# the test run: it measures, it does not assert.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-60}
SETTLE=${SETTLE:-20}
MEASURE=${MEASURE:-90}
IDLE=${IDLE:-30}
URI=qemu:///system
LAB=/var/lib/vm-balancer-lab
BIN=${BIN:-target/release/vm-balancer}
work=$(mktemp -d)
agent=
cleanup() {
  [ -n "$agent" ] && kill "$agent" 2>/dev/null || true
  for i in $(seq 1 "$N"); do virsh -c $URI destroy "vmbt-cost-$i" >/dev/null 2>&1 || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# CPU time of a process, in clock ticks (fields 14 and 15 of /proc/PID/stat, after the name).
ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; }
hz=$(getconf CLK_TCK)

for i in $(seq 1 "$N"); do
  cat >"$work/$i.xml" <<XML
<domain type='qemu'><name>vmbt-cost-$i</name><memory unit='MiB'>128</memory><currentMemory unit='MiB'>128</currentMemory><vcpu>1</vcpu>
<os><type arch='x86_64'>hvm</type><kernel>$LAB/vmlinuz</kernel><initrd>$LAB/initrd.img</initrd><cmdline>console=ttyS0 quiet vmb.burn=0</cmdline></os>
<features><acpi/><apic/></features><devices><serial type='file'><source path='$work/$i.log'/></serial><memballoon model='virtio'><stats period='1'/></memballoon></devices></domain>
XML
  virsh -c $URI create "$work/$i.xml" >/dev/null
done
ld=$(pgrep -x libvirtd | head -1)
l0=$(ticks "$ld"); sleep "$IDLE"; l1=$(ticks "$ld")
"$BIN" run --quantum 1s --exclude none "$@" >/dev/null 2>"$work/agent.log" &
agent=$!
sleep "$SETTLE"
a0=$(ticks "$agent"); l2=$(ticks "$ld")
sleep "$MEASURE"
a1=$(ticks "$agent"); l3=$(ticks "$ld")
awk -v hz="$hz" -v m="$MEASURE" -v n="$N" -v idle=$((l1 - l0)) -v it="$IDLE" -v lab=$((l3 - l2)) -v ag=$((a1 - a0)) -v args="$*" 'BEGIN {
  i = idle / it / hz * 1000; l = lab / m / hz * 1000
  printf "%d guests, args [%s]: agent %.2f ms per 1 s quantum; libvirtd %.2f ms/s (idle %.2f, added %.2f)\n", n, args, ag / m / hz * 1000, l, i, l - i
}'
