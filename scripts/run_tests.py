"""The test command: the whole suite on this machine's backends.

pytest exits with 5 when it collects no test; for this project that means a broken selection or
layout, never success, so it is reported as a failure with its own message.
"""

import os
import sys

import pytest

NO_TESTS_COLLECTED = 5


def main() -> int:
    workers = ["-n", "auto"] if (os.cpu_count() or 1) > 1 else []
    code = pytest.main(["-q", *workers, *sys.argv[1:]])
    if code == NO_TESTS_COLLECTED:
        print("run_tests: pytest collected no tests: the selection or the test layout is broken", file=sys.stderr)
        return 1
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
