#!/usr/bin/env bash
# Run the logsink benchmark; every argument goes to `python -m logsink.bench` (see README.md here).
# PYTHON picks the interpreter that has logsink installed (default: python3).
set -euo pipefail
exec "${PYTHON:-python3}" -m logsink.bench "$@"
