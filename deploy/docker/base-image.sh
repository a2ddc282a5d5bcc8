#!/usr/bin/env bash
# Builds a Debian bookworm base image with python3 from Debian's packages alone, for hosts that
# reach Debian's package mirror but no image registry (docker-compose.offline.yml builds the
# genset image on it):
#   deploy/docker/base-image.sh [TAG]          # default TAG genset-base:bookworm
# debootstrap (minbase + python3 + python3-venv) -> trimmed root -> `docker import`. The root's
# tarball is kept (GENSET_BASE_CACHE, default .state/docker/base-bookworm.tar, ~130 MB) so a
# second run skips debootstrap (measured here: 45-190 s with debootstrap, ~3 s without).
# Needs root (debootstrap chroots), debootstrap and a running Docker engine.
# DEBIAN_MIRROR picks the mirror (default: debootstrap's own).
set -euo pipefail

TAG=${1:-genset-base:bookworm}
CACHE=${GENSET_BASE_CACHE:-.state/docker/base-bookworm.tar}

if docker image inspect "$TAG" >/dev/null 2>&1; then
    echo "base image $TAG: present"
    exit 0
fi
if [ ! -s "$CACHE" ]; then
    command -v debootstrap >/dev/null || {
        echo "base-image.sh: debootstrap not found (apt-get install debootstrap)" >&2; exit 1; }
    [ "$(id -u)" = 0 ] || { echo "base-image.sh: debootstrap needs root" >&2; exit 1; }
    mkdir -p "$(dirname "$CACHE")"
    root=$(mktemp -d "${TMPDIR:-/tmp}/genset-base.XXXXXX")
    trap 'rm -rf "$root" "$root.log"' EXIT
    echo "base image $TAG: debootstrap bookworm (about a minute)"
    # shellcheck disable=SC2086  # DEBIAN_MIRROR is one word or nothing
    debootstrap --variant=minbase --include=python3,python3-venv bookworm "$root" \
        ${DEBIAN_MIRROR:-} >"$root.log" 2>&1 || {
        tail -20 "$root.log" >&2; echo "base-image.sh: debootstrap failed" >&2; exit 1; }
    # Package lists, the .deb cache, docs and translations are half the root (275 -> 133 MB)
    # and nothing in the image reads them.
    rm -rf "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
           "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
           "$root"/usr/share/locale/*
    tar --numeric-owner -C "$root" -cf "$CACHE.tmp" .
    mv "$CACHE.tmp" "$CACHE"
fi
docker import \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'ENV LANG=C.UTF-8' \
    -c 'CMD ["/bin/bash"]' \
    "$CACHE" "$TAG" >/dev/null
echo "base image $TAG: imported from $CACHE"
