"""``podiam-agent``: check the [agent] extra is installed, parse flags, then run the agent as a
process; ``podiam-agent cleanup`` removes the DNAT rule the agent leaves in place."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from runtime import process
from runtime.extras import require_extra


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["cleanup"]:
        from agent import cleanup  # without the agent's own (heavier) imports

        return cleanup.main(argv[1:])
    require_extra("agent", prog="podiam-agent")
    # Imported only now: without the extra, these would fail with a traceback.
    # uvloop starts iptables and conntrack with fork(), which runs gRPC's fork handlers (and
    # their log line) unless they are off; the children exec at once and need none of them.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    import uvloop  # the metadata listener's event loop (agent/httpserver.py)

    from agent.app import PodiamAgent
    from agent.config import parse_config

    return process.main(
        parse_config(argv), PodiamAgent, name="podiam.agent", loop_factory=uvloop.new_event_loop
    )


if __name__ == "__main__":
    sys.exit(main())
