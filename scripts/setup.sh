#!/usr/bin/env bash
# Installs every system package ddpm-rs needs to build and test on Debian/Ubuntu. Idempotent: packages
# already present are skipped by apt itself, and the apt index is refreshed only when something is missing.
set -euo pipefail

PKGS=(
  build-essential pkg-config cmake clang libclang-dev
  libopenmpi-dev openmpi-bin
  libhdf5-dev hdf5-tools
  dataset-fashion-mnist
  python3 python3-venv
)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
  echo "setup: not root, using sudo"
fi

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all system packages present (${PKGS[*]})"
else
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install a Rust toolchain (rustup) first" >&2
  exit 1
fi
echo "setup: $(cargo --version)"
echo "setup: done"
