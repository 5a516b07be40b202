#!/usr/bin/env bash
# Builds the Debian package and prints its path (target/debian/vm-balancer_<version>_<arch>.deb).
# cargo-deb packs files that must exist before it runs, so this script makes them first:
# - the binary (`cargo build --release`);
# - the man page and the shell completions, written by the binary itself from its clap
#   definitions (the hidden `vm-balancer generate-assets DIR`), the man page gzipped;
# - the packaged unit: systemd/vm-balancer.service with /usr/local/bin/ replaced by /usr/sbin/,
#   the only difference (tests/e2e_deb.rs checks it).
# Installs cargo-deb from crates.io when it is missing. Needs dpkg-dev (dpkg-shlibdeps computes
# the package's dependencies) and binutils (strip).
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf 'package: %s\n' "$*" >&2; }

if ! cargo deb --version >/dev/null 2>&1; then
  log "installing cargo-deb"
  cargo install --locked cargo-deb
fi

cargo build --release --locked --bin vm-balancer
assets=target/assets
rm -rf "$assets"
mkdir -p "$assets/systemd"
"${CARGO_TARGET_DIR:-target}/release/vm-balancer" generate-assets "$assets" >/dev/null
gzip -9n "$assets/vm-balancer.8"
sed 's#/usr/local/bin/#/usr/sbin/#g' systemd/vm-balancer.service >"$assets/systemd/vm-balancer.service"

# --no-build: the binary above is the one the assets were generated from.
# --strip: cargo-deb keeps debug info when the profile has it (ours does, for profiling).
deb=$(cargo deb --no-build --strip | tail -n 1)
[ -f "$deb" ] || { log "cargo deb printed no package path"; exit 1; }
log "built $deb ($(du -h "$deb" | cut -f1))"
printf '%s\n' "$deb"
