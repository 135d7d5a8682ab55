"""``podiam-agent``: parse flags, then run the agent as a process."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from agent.app import PodiamAgent
from agent.config import parse_config
from server import process


def main(argv: Sequence[str] | None = None) -> int:
    return process.main(parse_config(argv), PodiamAgent, name="podiam.agent")


if __name__ == "__main__":
    sys.exit(main())
