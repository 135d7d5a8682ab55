"""Connecting to the Kubernetes API: loading the configuration and checking, before anything
listens, that the API answers.

Everything that can be wrong here (a missing or malformed kubeconfig, a wrong address, a
refusing API server) is fatal at start-up, so each failure becomes one ``KubeConfigError`` that
names the file or the URL, instead of the client library's warnings and later obscure errors.
"""

from __future__ import annotations

import asyncio
import os

import aiohttp
import yaml
from kubernetes_asyncio.client import ApiClient, Configuration, VersionApi
from kubernetes_asyncio.config import ConfigException, load_incluster_config, load_kube_config
from kubernetes_asyncio.config.kube_config import KUBE_CONFIG_DEFAULT_LOCATION

from server.kube_status import describe, status_message


class KubeConfigError(Exception):
    """The Kubernetes API cannot be used: bad configuration or unreachable. Fatal at start-up."""


async def load_api_client(kubeconfig: str | None) -> ApiClient:
    """An API client from ``kubeconfig``, or with None from the pod's service account when
    running in a cluster, else from $KUBECONFIG or ~/.kube/config as kubectl would."""
    configuration = Configuration()
    if kubeconfig is not None:
        await _load_kubeconfig(kubeconfig, configuration)
        return ApiClient(configuration)
    try:
        load_incluster_config(client_configuration=configuration)
    except ConfigException as in_cluster_error:
        try:
            await _load_kubeconfig(KUBE_CONFIG_DEFAULT_LOCATION, configuration)
        except KubeConfigError as error:
            raise KubeConfigError(
                f"not running in a cluster ({in_cluster_error}), and {error}"
            ) from error
    return ApiClient(configuration)


async def _load_kubeconfig(paths: str, configuration: Configuration) -> None:
    # kubernetes_asyncio warns and carries on when a file is missing, and fails later with an
    # obscure TypeError; check each file ourselves first so the operator gets one clear line.
    _check_kubeconfig_files(paths)
    try:
        await load_kube_config(
            config_file=paths, client_configuration=configuration, persist_config=False
        )
    except Exception as error:  # the loader raises many types for a malformed file
        raise KubeConfigError(f"kubeconfig {paths}: {describe(error)}") from error


def _check_kubeconfig_files(paths: str) -> None:
    for path in filter(None, paths.split(os.pathsep)):
        _check_kubeconfig_file(os.path.expanduser(path))


def _check_kubeconfig_file(path: str) -> None:
    try:
        with open(path) as file:
            content = yaml.safe_load(file)
    except OSError as error:
        raise KubeConfigError(f"kubeconfig {path}: {error.strerror or error}") from error
    except yaml.YAMLError as error:
        raise KubeConfigError(f"kubeconfig {path}: not valid YAML: {error}") from error
    if not isinstance(content, dict):
        raise KubeConfigError(f"kubeconfig {path}: not a kubeconfig (expected a YAML mapping)")


async def check_api_reachable(api: ApiClient, timeout: float = 10) -> None:  # noqa: ASYNC109
    """Ask the API server for its version, so a wrong address fails start-up clearly."""
    url = api.configuration.host
    try:
        async with asyncio.timeout(timeout):
            response = await VersionApi(api).get_code(_preload_content=False)
            async with response:
                body = await response.read()
    except TimeoutError as error:
        raise KubeConfigError(
            f"Kubernetes API at {url} unreachable: no answer in {timeout:g}s"
        ) from error
    except (aiohttp.ClientError, OSError) as error:
        raise KubeConfigError(f"Kubernetes API at {url} unreachable: {describe(error)}") from error
    if response.status != 200:
        # Reachable but refusing us (401, 403) is as fatal at start-up, and as clear.
        detail = status_message(body) or response.reason
        raise KubeConfigError(f"Kubernetes API at {url} answered HTTP {response.status}: {detail}")
