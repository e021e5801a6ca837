#!/bin/bash
# The README's test command: linters, type checks, then the whole test suite
# (unit, user-namespace, registry, root, Slurm tiers — all of them, as CI does).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=/opt/mesobox/venv
[ -x "$VENV/bin/python" ] || bash scripts/setup-host.sh
"$VENV/bin/ruff" check src tests bench
"$VENV/bin/mypy" src/mesobox
exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
