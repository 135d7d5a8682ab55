"""Which variant the demo and the local stack can run here: network namespaces (root, ``ip``,
``iptables``) or loopback."""

from __future__ import annotations

import os
import shutil


def why_not_namespaces() -> tuple[str, str] | None:
    """Why the demo cannot use network namespaces here and what would change that, or None
    when it can."""
    if os.environ.get("PODIAM_DEMO") == "loopback":
        return "PODIAM_DEMO=loopback asks for the loopback variant", "Without it"
    if os.geteuid() != 0:
        return "network namespaces and iptables need root", "As root (with ip and iptables)"
    missing = [tool for tool in ("ip", "iptables") if not shutil.which(tool)]
    if not missing:
        return None
    packages = {"ip": "iproute2", "iptables": "iptables"}
    install = " and ".join(packages[tool] for tool in missing)
    return f"{' and '.join(missing)} not installed", f"With {install} installed"
