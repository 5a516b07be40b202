#!/usr/bin/env bash
# The project's whole test run, from a fresh Debian 12 machine as root:
# sets up the libvirt lab (packages, libvirtd, guest image), then builds and runs every test
# (unit, CLI, simulator, end-to-end on real QEMU guests), the lints (clippy, rustfmt), the unit
# file (systemd-analyze) and checks that the benches compile.
set -euo pipefail
cd "$(dirname "$0")/.."
bash lab/setup.sh
# Leftover agents and guests of an interrupted earlier run would move pins and load the cpus
# the tests measure.
pkill -f '/target/release/vm-balancer run' 2>/dev/null || true
for d in $(virsh -c qemu:///system list --name 2>/dev/null | grep '^vmbt-' || true); do
  virsh -c qemu:///system destroy "$d" >/dev/null 2>&1 || true
done
cargo fmt --check
cargo build --release --all-targets --locked
cargo clippy --release --all-targets --locked -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --release --locked --no-fail-fast -- --test-threads=2 2>&1 | tee "$log"
cargo bench --locked --no-run
# One closing line over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
