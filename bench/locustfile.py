"""Load-test a real podiam-agent with locust, with users that behave like AWS SDKs.

Each user is one pod's SDK: it takes an IMDSv2 token (``PUT /latest/api/token``), asks for its
role name (``GET .../security-credentials/``), then for that role's credentials, and repeats
after ``PODIAM_LOCUST_WAIT`` seconds — or, with ``PODIAM_LOCUST_REFRESH_ONLY=1``, keeps its token
and asks for credentials only, as an SDK refreshing them does.

The agent tells pods apart by their source address, so point locust at the agent from where
pods are (a pod, or a node whose DNAT rule sends 169.254.169.254 to the agent), or give the
users source addresses of their own that the agent's server knows as pod IPs:

    pip install locust      # or `make up`: a local stack, and the command that loads it
    # from inside a pod (or a node), the way SDKs reach it:
    locust -f bench/locustfile.py --host http://169.254.169.254 --headless -u 50 -r 10 -t 1m
    # on loopback, where pods are 127.x addresses (as in the benchmark and the tests):
    PODIAM_LOCUST_SOURCES=127.0.1.1-127.0.1.50 \
        locust -f bench/locustfile.py --host http://127.0.0.1:8181 --headless -u 50 -t 1m

``PODIAM_LOCUST_SOURCES``: comma-separated addresses or ``first-last`` ranges (last octet);
user k binds to address k modulo their number. A 404 for the role name means the address is
not a pod the agent knows; 503 that the agent has no server connection yet.
"""

from __future__ import annotations

import ipaddress
import itertools
import os

from locust import HttpUser, between, task
from requests.adapters import HTTPAdapter

TOKEN_TTL = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN = "X-aws-ec2-metadata-token"
CREDENTIALS = "/latest/meta-data/iam/security-credentials/"


def _sources(spec: str) -> list[str]:
    addresses: list[str] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        first, _, last = part.partition("-")
        start = ipaddress.ip_address(first)
        end = ipaddress.ip_address(last) if last else start
        addresses += [str(ipaddress.ip_address(n)) for n in range(int(start), int(end) + 1)]
    return addresses


_SOURCES = _sources(os.environ.get("PODIAM_LOCUST_SOURCES", ""))
_NEXT_SOURCE = itertools.count()
_WAIT = float(os.environ.get("PODIAM_LOCUST_WAIT", "1"))


class _SourceAdapter(HTTPAdapter):
    """Binds every connection of one user to its pod's address."""

    def __init__(self, source: str) -> None:
        self._source = source
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        kwargs["source_address"] = (self._source, 0)
        return super().init_poolmanager(*args, **kwargs)


class SdkUser(HttpUser):
    """One pod's SDK: token, role name, credentials."""

    wait_time = between(_WAIT * 0.5, _WAIT * 1.5)

    def on_start(self) -> None:
        if _SOURCES:
            source = _SOURCES[next(_NEXT_SOURCE) % len(_SOURCES)]
            adapter = _SourceAdapter(source)
            self.client.mount("http://", adapter)
        self.token = ""
        self.role = ""

    def _token(self) -> str:
        with self.client.put(
            "/latest/api/token", headers={TOKEN_TTL: "21600"}, name="token", catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"token: HTTP {response.status_code}")
                return ""
            return response.text

    @task
    def fetch_credentials(self) -> None:
        refresh_only = os.environ.get("PODIAM_LOCUST_REFRESH_ONLY") == "1"
        if not (refresh_only and self.token):
            self.token = self._token()
            if not self.token:
                return
        headers = {TOKEN: self.token}
        if not (refresh_only and self.role):
            with self.client.get(
                CREDENTIALS, headers=headers, name="role", catch_response=True
            ) as response:
                if response.status_code != 200:
                    response.failure(f"role: HTTP {response.status_code}")
                    return
                self.role = response.text
        with self.client.get(
            CREDENTIALS + self.role, headers=headers, name="credentials", catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"credentials: HTTP {response.status_code}")
            elif '"AccessKeyId"' not in response.text:
                response.failure("credentials: no AccessKeyId in the answer")
