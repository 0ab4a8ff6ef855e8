#!/usr/bin/env bash
# Run the logsink benchmark; every argument goes to `python -m logsink.bench`, which runs
# benchmarks/logsink_bench/engines.py (see README.md here).
# PYTHON picks the interpreter that has logsink installed (default: python3).
set -euo pipefail
exec "${PYTHON:-python3}" -m logsink.bench "$@"
