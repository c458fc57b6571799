#!/usr/bin/env bash
# Install the Debian 12 packages orc needs to build, test and benchmark, if missing.
set -euo pipefail
pkgs=(pkg-config build-essential cmake curl libclang-dev protobuf-compiler librocksdb-dev libseccomp-dev etcd-server busybox-static runc iproute2 nftables docker-registry)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
  echo "cargo is not installed: orc needs a current Rust toolchain (rustup, Rust 1.89 or newer)" >&2
  exit 1
fi
