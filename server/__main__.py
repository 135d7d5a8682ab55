"""``podiam-server``: check the [server] extra is installed, parse flags, then run the server as a
process; ``podiam-server explain NAMESPACE/POD`` asks a running server about one pod."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from runtime import process
from runtime.extras import require_extra


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["explain"]:
        from server import explain_cli  # a gRPC client: none of the server's own imports

        return explain_cli.main(argv[1:])
    require_extra("server", prog="podiam-server")
    # Imported only now: without the extra, these would fail with a traceback.
    from server.app import PodiamServer
    from server.config import parse_config

    return process.main(parse_config(argv), PodiamServer, name="podiam.server")


if __name__ == "__main__":
    sys.exit(main())
