#!/usr/bin/env bash
# Prepares this machine for Drover's demo and tests. Idempotent: every step
# checks first and does nothing when its result is already there.
#
#  1. Debian packages: debootstrap (offline base image), docker-registry and
#     apache2-utils (registry tests), busybox-static (tiny test image),
#     python3-azure (identity conformance tests), packer and systemd's
#     systemd-analyze (the VM image tests); docker.io only when no Docker
#     engine is installed at all.
#  2. A running Docker engine (dockerd is started if `docker info` fails).
#  3. moto[server] from PyPI (the S3 API of the artifact-store tests).
#  4. The offline images (images/build-offline.sh; existing ones are kept).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*" >&2; }
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

missing=()
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v docker-registry >/dev/null || missing+=(docker-registry)
command -v htpasswd >/dev/null || missing+=(apache2-utils)
dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
/usr/bin/python3 -c 'import azure.identity' >/dev/null 2>&1 || missing+=(python3-azure)
command -v packer >/dev/null || missing+=(packer)
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v docker >/dev/null || missing+=(docker.io)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# The Debian package starts a registry on :5000 where systemd runs; the tests
# start their own on a free port and need nothing from it.

if ! docker info >/dev/null 2>&1; then
  log "starting dockerd"
  $SUDO sh -c 'nohup dockerd >/var/log/dockerd.log 2>&1 &'
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  docker info >/dev/null 2>&1 || { tail -n 30 /var/log/dockerd.log >&2; echo "dockerd did not start" >&2; exit 1; }
fi

# moto in server mode: the S3 API the artifact-store tests run against.
if ! python3 -c 'import moto.server' >/dev/null 2>&1; then
  if ! python3 -m pip --version >/dev/null 2>&1; then
    log "installing python3-pip"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends python3-pip
  fi
  log "installing moto[server] from PyPI"
  python3 -m pip install --quiet --break-system-packages 'moto[server]' ||
    python3 -m pip install --quiet 'moto[server]'
fi

images/build-offline.sh "${DROVER_IMAGES:-all}"
log "setup done"
