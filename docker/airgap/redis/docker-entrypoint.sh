#!/bin/sh
# The official redis image's entrypoint contract, the part compose.yaml relies on: a
# `redis-server` without a config file that sets protected-mode runs with `--protected-mode no`
# (the network, not Redis, keeps strangers out), so the other containers may connect.
set -e
if [ "$1" = redis-server ]; then
  shift
  if [ -f "${1:-}" ] && grep -q '^protected-mode' "$1"; then
    set -- redis-server "$@"
  elif [ -f "${1:-}" ]; then
    config="$1"
    shift
    set -- redis-server "$config" --protected-mode no "$@"
  else
    set -- redis-server --protected-mode no "$@"
  fi
fi
exec "$@"
