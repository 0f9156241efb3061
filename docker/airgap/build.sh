#!/usr/bin/env bash
# Builds every image the compose stack needs without an image registry: only Debian's archive
# (debootstrap, apt) and PyPI (pip) are reached. Tags match docker/compose.airgap.yaml:
#
#   runops-airgap/debian:bookworm     debootstrap --variant=minbase, imported (skipped if present)
#   runops-airgap/python:3.11         Debian's python3 on that base (the Dockerfile's PYTHON_IMAGE)
#   runops-airgap/postgres:15         Debian's postgresql-15, the official image's entrypoint contract
#   runops-airgap/redis:7             Debian's redis-server and redis-cli
#   runops-airgap/moto:5              moto's S3 server (moto[server] from PyPI), for MinIO's place
#   runops-airgap/runops:local        docker/Dockerfile with PYTHON_IMAGE=runops-airgap/python:3.11
#
# Usage: docker/airgap/build.sh [--force] [--ca-bundle FILE]
#   --force            rebuild the debootstrap base even if its tag exists (the rest is rebuilt
#                      through Docker's layer cache every time: seconds when nothing changed)
#   --ca-bundle FILE   extra CA certificates (PEM) that pip inside the builds must trust, e.g. a
#                      TLS-intercepting proxy's; passed as the build argument EXTRA_CA_CERTS to
#                      builder stages only, never into a final image. Also RUNOPS_BUILD_CA_BUNDLE.
# Environment: DEBIAN_MIRROR (http://deb.debian.org/debian), DOCKER (docker).
set -euo pipefail
cd "$(dirname "$0")/../.."

force=0
ca_bundle="${RUNOPS_BUILD_CA_BUNDLE:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --force) force=1 ;;
    --ca-bundle) ca_bundle="$2"; shift ;;
    *) echo "usage: $0 [--force] [--ca-bundle FILE]" >&2; exit 2 ;;
  esac
  shift
done

DOCKER="${DOCKER:-docker}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
BASE=runops-airgap/debian:bookworm
PYTHON=runops-airgap/python:3.11
AIRGAP=docker/airgap

ca_args=()
if [ -n "$ca_bundle" ]; then
  ca_args=(--build-arg "EXTRA_CA_CERTS=$(cat "$ca_bundle")")
fi

started=$SECONDS
root=""
logs="$(mktemp -d)"
trap 'rm -rf "$logs" ${root:+"$root"}' EXIT

timed() {  # timed LABEL COMMAND...: runs it, prints how long it took
  local label="$1" t0=$SECONDS
  shift
  "$@"
  printf 'airgap: %-28s %4ds\n' "$label" $((SECONDS - t0))
}

base_image() {
  if [ "$force" = 0 ] && "$DOCKER" image inspect "$BASE" >/dev/null 2>&1; then
    echo "airgap: $BASE present (--force rebuilds it)"
    return
  fi
  command -v debootstrap >/dev/null || { echo "airgap: debootstrap is missing (apt-get install debootstrap)" >&2; return 1; }
  root="$(mktemp -d /var/tmp/runops-rootfs.XXXXXX)"
  debootstrap --variant=minbase bookworm "$root" "$MIRROR" >/dev/null
  # The suites the official images use too: point releases and security fixes.
  cat > "$root/etc/apt/sources.list" <<SOURCES
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb ${MIRROR%/debian}/debian-security bookworm-security main
SOURCES
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | "$DOCKER" import \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["bash"]' - "$BASE" >/dev/null
  rm -rf "$root"
}

build() {  # build TAG CONTEXT DOCKERFILE [ARGS...]
  local tag="$1" context="$2" file="$3"
  shift 3
  "$DOCKER" build --quiet -f "$file" -t "$tag" "$@" "$context" >/dev/null
}

# Builds that do not depend on each other run side by side (mostly waiting on downloads);
# each one's output is shown only if it fails.
declare -A running=()
start() {  # start LABEL COMMAND...
  local label="$1"
  shift
  timed "$label" "$@" >"$logs/$label" 2>&1 &
  running[$label]=$!
}
finish() {  # waits for everything start()ed; fails if any of it failed
  local label failed=0
  for label in "${!running[@]}"; do
    if wait "${running[$label]}"; then
      grep '^airgap:' "$logs/$label"
    else
      echo "airgap: $label FAILED:"
      cat "$logs/$label"
      failed=1
    fi
  done
  running=()
  return $failed
}

timed "base (debootstrap)" base_image
start python build "$PYTHON" $AIRGAP $AIRGAP/python.Dockerfile --build-arg BASE_IMAGE="$BASE"
start postgres build runops-airgap/postgres:15 $AIRGAP $AIRGAP/postgres.Dockerfile --build-arg BASE_IMAGE="$BASE"
start redis build runops-airgap/redis:7 $AIRGAP $AIRGAP/redis.Dockerfile --build-arg BASE_IMAGE="$BASE"
finish
start moto build runops-airgap/moto:5 $AIRGAP $AIRGAP/moto.Dockerfile --build-arg PYTHON_IMAGE="$PYTHON" "${ca_args[@]}"
start runops build runops-airgap/runops:local . docker/Dockerfile --build-arg PYTHON_IMAGE="$PYTHON" "${ca_args[@]}"
finish
printf 'airgap: %-28s %4ds\n' "all images" $((SECONDS - started))
