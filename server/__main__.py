"""``podiam-server``: parse flags, then run the server as a process."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from server import process
from server.app import PodiamServer
from server.config import parse_config


def main(argv: Sequence[str] | None = None) -> int:
    return process.main(parse_config(argv), PodiamServer, name="podiam.server")


if __name__ == "__main__":
    sys.exit(main())
