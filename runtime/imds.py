"""The EC2 instance metadata service's contract: its paths, headers and document values.

Both programs speak it: the agent impersonates IMDS to pods and proxies part of it to the
real service; the server reads the node's instance profile from the real service to find the
base ARN of roles, and renders the credentials the agent serves. The agent and the server do
not import each other, so the facts they share live here, once.
"""

from __future__ import annotations

# The metadata service's address as every AWS SDK knows it.
METADATA_IP = "169.254.169.254"
ENDPOINT = f"http://{METADATA_IP}"

# IMDSv2: a PUT with the TTL header mints a session token; later requests carry it.
TOKEN_PATH = "/latest/api/token"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"

CREDENTIALS_PATH = "/latest/meta-data/iam/security-credentials/"
# Newer Go, Java, Ruby and PHP SDKs try this first and fall back only on 404.
EXTENDED_CREDENTIALS_PATH = "/latest/meta-data/iam/security-credentials-extended"
INFO_PATH = "/latest/meta-data/iam/info"

# What real IMDS puts in "Code" and "Type" of the credentials document.
CODE_SUCCESS = "Success"
CREDENTIALS_TYPE = "AWS-HMAC"
# Its time format: UTC, whole seconds, as real IMDS writes and the SDKs parse.
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
