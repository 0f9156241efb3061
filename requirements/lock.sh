#!/usr/bin/env bash
# Re-resolves the lock files from pyproject.toml and requirements/build.in. Run it after editing
# either (tests/test_lockfile.py fails until you do), from any directory:
#
#   bash requirements/lock.sh                          # keep every pin that still fits
#   bash requirements/lock.sh --upgrade-package NAME   # move one package (or --upgrade: all)
#
# dev.lock (runtime + dev extras + build backend) is resolved first; runtime.lock and build.lock
# are constrained to it, so CI tests exactly the versions the image ships. The locks are
# universal (any OS) for CPython 3.11, hashed for `pip install --require-hashes`, and name no
# index: they install from whatever index pip is configured with. uv comes with the dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."

compile=(python3 -m uv pip compile --quiet --universal --python-version 3.11 --generate-hashes
  --custom-compile-command 'bash requirements/lock.sh')

"${compile[@]}" "$@" pyproject.toml --extra dev requirements/build.in -o requirements/dev.lock
"${compile[@]}" pyproject.toml -c requirements/dev.lock -o requirements/runtime.lock
"${compile[@]}" requirements/build.in -c requirements/dev.lock -o requirements/build.lock
