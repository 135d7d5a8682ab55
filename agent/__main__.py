"""``podiam-agent``: parse flags, configure logging, run."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from agent.app import StartupError, run
from agent.config import parse_config
from server import logs


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    logs.configure(config.log_level, json_log=config.json_log)
    try:
        asyncio.run(run(config))
    except StartupError as error:
        # One line, whatever the cause's own formatting.
        logging.getLogger("podiam.agent").error("cannot start: %s", " ".join(str(error).split()))
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
