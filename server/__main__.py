"""``podiam-server``: parse flags, configure logging, run."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from server import logs
from server.app import StartupError, run
from server.config import parse_config


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    logs.configure(config.log_level, json_log=config.json_log)
    try:
        asyncio.run(run(config))
    except StartupError as error:
        # One line, whatever the cause's own formatting (YAML errors span several).
        logging.getLogger("podiam.server").error("cannot start: %s", " ".join(str(error).split()))
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
