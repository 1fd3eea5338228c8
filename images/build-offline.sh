#!/usr/bin/env bash
# Builds Drover's base image without any container registry, then the job
# environments on top of it. Images that already exist are skipped, so the
# script is cheap to re-run (CI calls it on every run).
#
#   images/build-offline.sh            # base + every environment
#   images/build-offline.sh base       # only drover/base:bookworm
#
# The Debian mirror is read from this machine's apt configuration, so the same
# script works behind whatever mirror or proxy the machine already uses.
# Set DROVER_REBUILD=1 to rebuild images that exist.
set -euo pipefail

SUITE=${DROVER_SUITE:-bookworm}
BASE_IMAGE=${DROVER_BASE_IMAGE:-drover/base:$SUITE}
HERE=$(cd "$(dirname "$0")" && pwd)
WHAT=${1:-all}

log() { printf '==> %s\n' "$*" >&2; }

image_exists() {
  [ "${DROVER_REBUILD:-0}" != 1 ] && docker image inspect "$1" >/dev/null 2>&1
}

# First http(s) mirror that apt uses for the Debian archive (deb822 or one-line format).
debian_mirror() {
  local m=""
  if compgen -G "/etc/apt/sources.list.d/*.sources" >/dev/null; then
    m=$(awk '/^URIs:/ {for (i = 2; i <= NF; i++) if ($i !~ /security/) {print $i; exit}}' \
      /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)
  fi
  if [ -z "$m" ] && [ -f /etc/apt/sources.list ]; then
    m=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' \
      /etc/apt/sources.list | head -n1)
  fi
  echo "${DROVER_DEBIAN_MIRROR:-${m:-http://deb.debian.org/debian}}"
}

build_base() {
  # A base from before nodes kept an IMDS firewall lacks iptables: rebuilt.
  if image_exists "$BASE_IMAGE" &&
    docker run --rm --network none --entrypoint /bin/sh "$BASE_IMAGE" -c 'command -v iptables' >/dev/null 2>&1; then
    log "$BASE_IMAGE exists, skipping"
    return
  fi
  command -v debootstrap >/dev/null || { echo "debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
  local mirror rootfs
  mirror=$(debian_mirror)
  rootfs=$(mktemp -d /var/tmp/drover-rootfs.XXXXXX)
  trap 'rm -rf "$rootfs"' RETURN
  log "debootstrap --variant=minbase $SUITE from $mirror (a few minutes)"
  # iptables: a node's agent keeps its IMDS firewall with it.
  debootstrap --variant=minbase --include=iptables "$SUITE" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || {
    tail -n 30 "$rootfs.log" >&2; rm -f "$rootfs.log"; exit 1; }
  rm -f "$rootfs.log"
  # Keep the image small and deterministic: no apt lists or caches.
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
  log "docker import -> $BASE_IMAGE"
  tar -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
}

# build_env NAME: images/env/NAME/Dockerfile -> drover/NAME:$SUITE, FROM the offline base.
build_env() {
  local name=$1 tag="drover/$1:$SUITE"
  if image_exists "$tag"; then
    log "$tag exists, skipping"
    return
  fi
  log "docker build $tag (FROM $BASE_IMAGE)"
  docker build --network host --build-arg "BASE=$BASE_IMAGE" -t "$tag" "$HERE/env/$name"
}

docker info >/dev/null 2>&1 || { echo "no Docker engine answers (is dockerd running?)" >&2; exit 1; }
case "$WHAT" in
  base) build_base ;;
  all) build_base; build_env openmpi; build_env pytorch ;;
  *) build_base; build_env "$WHAT" ;;
esac
