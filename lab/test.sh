#!/usr/bin/env bash
# The project's whole test run, from a fresh Debian 12 machine as root:
# sets up the libvirt lab (packages, libvirtd, guest image), then builds and runs every test
# (unit, CLI, simulator, end-to-end on real QEMU guests) and checks that the benches compile.
set -euo pipefail
cd "$(dirname "$0")/.."
bash lab/setup.sh
# Leftover guests of an interrupted earlier run would load the cpus the tests measure.
for d in $(virsh -c qemu:///system list --name 2>/dev/null | grep '^vmbt-' || true); do
  virsh -c qemu:///system destroy "$d" >/dev/null 2>&1 || true
done
cargo build --release --all-targets --locked
cargo test --release --locked -- --test-threads=2
cargo bench --locked --no-run
