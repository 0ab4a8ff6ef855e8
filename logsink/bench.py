"""`logsink bench` (and `python -m logsink.bench`): runs the benchmark harness that lives in the source
tree's benchmarks/ directory (see benchmarks/README.md, "Where the harness lives").

The harness is not part of the installed package; this entry point finds it next to the package (an
editable install or a checkout) or in $LOGSINK_BENCHMARKS, and says what to do when neither has it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "LOGSINK_BENCHMARKS"
HARNESS = "logsink_bench"


def benchmarks_dir() -> Path | None:
    """The benchmarks/ directory holding the harness package, or None."""
    candidates = [Path(os.environ[ENV])] if os.environ.get(ENV) else []
    candidates.append(Path(__file__).resolve().parent.parent / "benchmarks")
    return next((c.resolve() for c in candidates if (c / HARNESS / "engines.py").is_file()), None)


def main(argv: list[str] | None = None) -> int:
    where = benchmarks_dir()
    if where is None:
        print(f"logsink bench: the benchmark harness is not installed with the package: it lives in benchmarks/ of "
              f"the logsink source tree. Run it from a checkout (pip install -e . there, then logsink bench), or "
              f"point {ENV} at that benchmarks/ directory.", file=sys.stderr)
        return 2
    if str(where) not in sys.path:
        sys.path.insert(0, str(where))  # spawned producer processes inherit sys.path, so they find it too
    from logsink_bench import engines

    return engines.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
