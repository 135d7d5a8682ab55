"""Decoding the API server's JSON straight into the fields podiam reads (server/kube_wire.py):
what a list page and a watch event become, and what happens to objects of another shape."""

from __future__ import annotations

import json

import pytest

from server.kube_wire import Codec, Pod
from server.pods import pod_from_object
from tests.support.objects import pod_object


def pod_json(**changes) -> dict:
    obj = pod_object(
        "shop",
        "web-6d4cf56db6-abcde",
        ip="10.0.0.5",
        host_ip="10.1.0.1",
        role="app-web",
        labels={"pod-template-hash": "6d4cf56db6", "app": "web"},
        annotations={"unrelated.example.com/config": "{" * 1000},
    )
    obj["metadata"]["ownerReferences"] = [
        {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-6d4cf56db6",
         "uid": "rs-uid", "controller": True, "blockOwnerDeletion": True},
    ]  # fmt: skip
    obj["metadata"]["managedFields"] = [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}]
    obj["metadata"]["resourceVersion"] = "42"
    obj.update(changes)
    return obj


def page(*items: dict, token: str | None = None) -> bytes:
    metadata = {"resourceVersion": "42", **({"continue": token} if token else {})}
    return json.dumps({"kind": "PodList", "metadata": metadata, "items": list(items)}).encode()


def test_list_page_decodes_to_the_same_records_as_the_raw_objects():
    raw = pod_json()
    listed = Codec(Pod).page(page(raw, token="next"))
    (item,) = listed.items()
    assert (listed.resource_version, listed.continue_token) == ("42", "next")
    assert isinstance(item, Pod)
    assert pod_from_object(item) == pod_from_object(raw)
    record = pod_from_object(item)
    assert (record.role, record.workload, record.ip, record.host_ip) == (
        "app-web", "Deployment/web", "10.0.0.5", "10.1.0.1"
    )  # fmt: skip


def test_item_of_another_shape_makes_the_page_come_as_dictionaries():
    bad = pod_json()
    bad["metadata"]["annotations"]["iam.amazonaws.com/role"] = ["not", "a", "string"]
    items = Codec(Pod).page(page(pod_json(), bad)).items()
    assert all(isinstance(item, dict) for item in items)
    assert pod_from_object(items[0]).role == "app-web"
    with pytest.raises(ValueError):
        pod_from_object(items[1])


def test_list_answer_without_resource_version_is_refused():
    with pytest.raises(ValueError):
        Codec(Pod).page(b'{"kind": "PodList", "metadata": {}, "items": []}')


def test_watch_events_decode_to_type_object_and_version():
    line = json.dumps({"type": "MODIFIED", "object": pod_json()}).encode()
    kind, obj, version = Codec(Pod).event(line)
    assert (kind, version, obj.metadata.name) == ("MODIFIED", "42", "web-6d4cf56db6-abcde")


def test_error_event_carries_its_status_as_a_dictionary():
    status = {"kind": "Status", "status": "Failure", "code": 410, "message": "too old"}
    kind, obj, _ = Codec(Pod).event(json.dumps({"type": "ERROR", "object": status}).encode())
    assert (kind, obj["code"]) == ("ERROR", 410)


@pytest.mark.parametrize(
    "line", [b"[1, 2]", b'{"type": "ADDED"}', b'{"type": 5, "object": {}}', b'{"object": {}}']
)
def test_malformed_event_is_none(line):
    assert Codec(Pod).event(line) is None


def test_line_that_is_not_json_is_a_value_error():
    with pytest.raises(ValueError):
        Codec(Pod).event(b"{not json")


def test_codec_without_a_wire_struct_gives_whole_dictionaries():
    (item,) = Codec(None).page(page(pod_json())).items()
    assert item["metadata"]["managedFields"][0]["manager"] == "kubelet"
