"""``podiam-agent`` is not built yet (see the agent issue); it exits with a clear message."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("podiam-agent: not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
