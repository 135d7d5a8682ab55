"""whoami for boto3/botocore: the default credential chain, then STS GetCallerIdentity, with the
same output as the other languages' programs (tests/clients/README.md). Nothing to build.

Usage: python whoami.py [seconds]
"""

import json
import sys
import time

import boto3


def once(session: boto3.Session, sts) -> dict:
    line = {}
    try:
        # The session's refreshable credentials: the same object every call signs with.
        credentials = session.get_credentials()
        if credentials is None:
            return {"error": "NoCredentialsError: the default chain found no credentials"}
        frozen = credentials.get_frozen_credentials()
        line["access_key_id"] = frozen.access_key
        line["access_key_id_prefix"] = frozen.access_key[:4]
        line["provider"] = credentials.method
        line["arn"] = sts.get_caller_identity()["Arn"]
    except Exception as error:  # every failure is a line of output, never a traceback
        line["error"] = f"{type(error).__name__}: {error}"
    return line


def main() -> int:
    seconds = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    session = boto3.Session()
    sts = session.client("sts")
    deadline = time.monotonic() + seconds
    failed = False
    while True:
        line = once(session, sts)
        failed = failed or "error" in line
        print(json.dumps(line), flush=True)
        if time.monotonic() >= deadline:
            break
        time.sleep(1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
