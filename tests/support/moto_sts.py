"""A real STS-speaking server for tests: moto in server mode, behind a small HTTP front that
counts AssumeRole calls and can make them fail.

moto answers STS for real (credentials, expirations, GetCallerIdentity of assumed roles), but
keeps no per-test count of calls and cannot be told to fail. So clients talk to a front server
written here: it reads each request's STS action, records AssumeRole calls (role, session name,
external id, signing access key), answers with a proper STS XML error when told to fail — so
botocore parses the code as it would from AWS — and forwards everything else to moto unchanged.

It can also hand out short sessions (`shorten_sessions`): AssumeRole answers for some roles
carry an expiration seconds away instead of the 15 minutes or more STS allows, so that
credentials reach the end of their life while a test watches (refresh tests of SDKs in pods).
As AWS does, a request made with such credentials after their expiration (and a second's grace
for one signed just before it) is refused with ``ExpiredToken`` (moto itself never checks).
"""

from __future__ import annotations

import http.client
import logging
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs
from xml.sax.saxutils import escape

import boto3
import pytest
from moto.server import ThreadedMotoServer
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from server.identity import AwsCredentials

FAKE_ACCESS_KEY_ID = "testing"
FAKE_SECRET_ACCESS_KEY = "testing"
REGION = "us-east-1"

# Errors STS answers with 403; the rest are 400 (ServiceUnavailable is 503).
_STATUS_FOR_CODE = {"AccessDenied": 403, "ExpiredToken": 400, "ServiceUnavailable": 503}
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "te",
    "trailer",
    "upgrade",
}
_SIGNING_KEY = re.compile(r"Credential=([^/,\s]+)/")
_EXPIRATION = re.compile(rb"<Expiration>[^<]*</Expiration>")
_ACCESS_KEY = re.compile(rb"<AccessKeyId>([^<]+)</AccessKeyId>")
# A request signed a moment before its credentials expire may arrive a moment after.
_IN_FLIGHT = timedelta(seconds=1)


@dataclass(frozen=True, slots=True)
class AssumeRoleCall:
    role_arn: str
    session_name: str
    external_id: str | None
    duration_seconds: int | None
    # The access key id that signed the request: which credentials made the call.
    signed_with: str | None
    failed_with: str | None
    # Session tags as sent (Tags.member.N.Key/Value), in request order, and TransitiveTagKeys.
    tags: tuple[tuple[str, str], ...] = ()
    transitive_tag_keys: tuple[str, ...] = ()
    # When the front received it (time.monotonic()): what STS saw per second.
    at: float = 0.0


class MotoSts:
    def __init__(self, host: str = "127.0.0.1") -> None:
        # moto itself stays on loopback; only the front listens on ``host``.
        self._host = host
        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._lock = threading.Lock()
        self._calls: list[AssumeRoleCall] = []
        self._fail_next = 0
        self._fail_code = "AccessDenied"
        self._failing: str | None = None
        self._short_sessions: dict[str, int] = {}  # role ARN prefix -> lifetime in seconds
        self._expiring: dict[str, datetime] = {}  # access key id of a short session -> expiry
        self._front: Any = None
        self._front_thread: threading.Thread | None = None
        self._moto_address: tuple[str, int] | None = None
        self.endpoint_url = ""

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        # One access-log line per request from two servers drowns every other log line.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._moto.start()
        self._moto_address = self._moto.get_host_and_port()
        self._front = make_server(self._host, 0, self._app, threaded=True)
        self._front_thread = threading.Thread(
            target=self._front.serve_forever, name="moto-sts-front", daemon=True
        )
        self._front_thread.start()
        self.endpoint_url = f"http://{self._host}:{self._front.server_port}"

    def stop(self) -> None:
        if self._front is not None:
            self._front.shutdown()
            self._front.server_close()
            self._front = None
        if self._front_thread is not None:
            self._front_thread.join(timeout=5)
            self._front_thread = None
        self._moto.stop()

    # -- what tests ask and tell --------------------------------------------------------------

    def assume_role_calls(self, role_arn: str | None = None, *, failed: bool | None = None) -> int:
        """AssumeRole calls received (answered by moto or failed on purpose), optionally for one
        role, optionally only failed (True) or only successful (False) ones."""
        return len(self.calls(role_arn, failed=failed))

    def calls(
        self, role_arn: str | None = None, *, failed: bool | None = None
    ) -> list[AssumeRoleCall]:
        with self._lock:
            calls = list(self._calls)
        return [
            call
            for call in calls
            if (role_arn is None or call.role_arn == role_arn)
            and (failed is None or (call.failed_with is not None) == failed)
        ]

    def reset(self) -> None:
        with self._lock:
            self._calls.clear()
            self._fail_next = 0
            self._failing = None
            self._short_sessions.clear()
            self._expiring.clear()

    def fail_next(self, n: int, code: str = "AccessDenied") -> None:
        """The next `n` AssumeRole calls fail with `code`."""
        with self._lock:
            self._fail_next = n
            self._fail_code = code

    def set_failing(self, failing: bool, code: str = "AccessDenied") -> None:
        """Every AssumeRole call fails with `code` until set_failing(False)."""
        with self._lock:
            self._failing = code if failing else None

    def shorten_sessions(self, role_arn_prefix: str, seconds: int) -> None:
        """AssumeRole answers for roles whose ARN starts with `role_arn_prefix` expire `seconds`
        from now (moto's credentials themselves stay valid: only the advertised expiry moves)."""
        with self._lock:
            self._short_sessions[role_arn_prefix] = seconds

    # -- the front server ---------------------------------------------------------------------

    def _app(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        body = request.get_data()
        params = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        params.update({k: v for k, v in request.args.items()})
        authorization = request.headers.get("Authorization", "")
        if self._expired(authorization):
            return self._error("ExpiredToken")(environ, start_response)
        if params.get("Action") == "AssumeRole":
            failure = self._record(params, authorization)
            if failure is not None:
                return self._error(failure)(environ, start_response)
        response = self._forward(request, body)
        lifetime = self._short_lifetime(params)
        if lifetime is not None and response.status_code == 200:
            self._shorten(response, lifetime)
        return response(environ, start_response)

    def _shorten(self, response: Response, lifetime: int) -> None:
        expiry = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=lifetime)
        stamp = expiry.strftime("<Expiration>%Y-%m-%dT%H:%M:%SZ</Expiration>").encode()
        data = response.get_data()
        key = _ACCESS_KEY.search(data)
        if key is not None:
            with self._lock:
                self._expiring[key.group(1).decode()] = expiry
        response.set_data(_EXPIRATION.sub(stamp, data))

    def _expired(self, authorization: str) -> bool:
        signed_with = _SIGNING_KEY.search(authorization)
        if signed_with is None:
            return False
        with self._lock:
            expiry = self._expiring.get(signed_with.group(1))
        return expiry is not None and datetime.now(UTC) >= expiry + _IN_FLIGHT

    def _short_lifetime(self, params: dict[str, str]) -> int | None:
        if params.get("Action") != "AssumeRole":
            return None
        role_arn = params.get("RoleArn", "")
        with self._lock:
            for prefix, seconds in self._short_sessions.items():
                if role_arn.startswith(prefix):
                    return seconds
        return None

    def _record(self, params: dict[str, str], authorization: str) -> str | None:
        signed_with = _SIGNING_KEY.search(authorization)
        with self._lock:
            failure: str | None = self._failing
            if failure is None and self._fail_next > 0:
                self._fail_next -= 1
                failure = self._fail_code
            duration = params.get("DurationSeconds")
            self._calls.append(
                AssumeRoleCall(
                    role_arn=params.get("RoleArn", ""),
                    session_name=params.get("RoleSessionName", ""),
                    external_id=params.get("ExternalId"),
                    duration_seconds=int(duration) if duration else None,
                    signed_with=signed_with.group(1) if signed_with else None,
                    failed_with=failure,
                    tags=_members(params, "Tags", ("Key", "Value")),
                    at=time.monotonic(),
                    transitive_tag_keys=tuple(
                        value for (value,) in _members(params, "TransitiveTagKeys", ())
                    ),
                )
            )
        return failure

    @staticmethod
    def _error(code: str) -> Response:
        sender = "Receiver" if code in ("ServiceUnavailable", "InternalFailure") else "Sender"
        xml = (
            '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
            f"<Error><Type>{sender}</Type><Code>{escape(code)}</Code>"
            f"<Message>injected by the test: {escape(code)}</Message></Error>"
            f"<RequestId>{uuid.uuid4()}</RequestId></ErrorResponse>"
        )
        return Response(xml, status=_STATUS_FOR_CODE.get(code, 400), content_type="text/xml")

    def _forward(self, request: Request, body: bytes) -> Response:
        assert self._moto_address is not None
        host, port = self._moto_address
        connection = http.client.HTTPConnection(host, port, timeout=30)
        try:
            headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
            connection.request(request.method, request.full_path.rstrip("?"), body, headers)
            answer = connection.getresponse()
            content = answer.read()
            out_headers = [(k, v) for k, v in answer.getheaders() if k.lower() not in _HOP_BY_HOP]
            return Response(content, status=answer.status, headers=out_headers)
        finally:
            connection.close()


def _members(params: dict[str, str], name: str, fields: tuple[str, ...]) -> tuple:
    """A query-protocol list: ``<name>.member.<n>[.<field>]``, in member order."""
    found = []
    n = 1
    while True:
        prefix = f"{name}.member.{n}"
        if fields:
            if f"{prefix}.{fields[0]}" not in params:
                break
            found.append(tuple(params.get(f"{prefix}.{field}", "") for field in fields))
        else:
            if prefix not in params:
                break
            found.append((params[prefix],))
        n += 1
    return tuple(found)


def fake_session() -> boto3.Session:
    """A boto3 session with moto's fake credentials, so no test reads the environment's."""
    return boto3.Session(
        aws_access_key_id=FAKE_ACCESS_KEY_ID,
        aws_secret_access_key=FAKE_SECRET_ACCESS_KEY,
        region_name=REGION,
    )


def caller_arn(endpoint_url: str, credentials: AwsCredentials) -> str:
    """GetCallerIdentity with the given credentials: who STS thinks they belong to."""
    client = boto3.Session(
        aws_access_key_id=credentials.access_key_id,
        aws_secret_access_key=credentials.secret_access_key,
        aws_session_token=credentials.token,
        region_name=REGION,
    ).client("sts", endpoint_url=endpoint_url)
    return client.get_caller_identity()["Arn"]


@pytest.fixture(scope="module", name="moto_sts")
def moto_sts_fixture() -> Iterator[MotoSts]:
    """A started `MotoSts` for the whole test module (tests/conftest.py loads this module as a
    plugin, so tests just ask for `moto_sts`)."""
    sts = MotoSts()
    sts.start()
    try:
        yield sts
    finally:
        sts.stop()
