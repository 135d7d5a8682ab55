"""The committed gRPC code must be what kiam.proto generates today."""

from __future__ import annotations

from pathlib import Path

from protos import generate


def test_committed_grpc_code_matches_the_proto(tmp_path: Path):
    generate.generate(tmp_path)
    for name in generate.GENERATED:
        committed = (generate.PROTOS_DIR / name).read_text()
        fresh = (tmp_path / name).read_text()
        assert fresh == committed, f"protos/{name} is stale: run `make protos` and commit"


def test_kiam_wire_contract_field_numbers():
    from protos import kiam_pb2

    def numbers(message):
        return {f.name: f.number for f in message.DESCRIPTOR.fields}

    assert kiam_pb2.DESCRIPTOR.package == "kiam"
    service = kiam_pb2.DESCRIPTOR.services_by_name["KiamService"]
    assert {"GetPodCredentials", "GetPodRole", "GetHealth"} <= set(service.methods_by_name)
    assert numbers(kiam_pb2.GetPodCredentialsRequest) == {"ip": 1, "role": 2}
    assert numbers(kiam_pb2.GetPodRoleRequest) == {"ip": 1}
    assert numbers(kiam_pb2.Role) == {"name": 1}
    assert numbers(kiam_pb2.HealthStatus) == {"message": 1}
    assert numbers(kiam_pb2.Credentials) == {
        "code": 1,
        "type": 2,
        "access_key_id": 3,
        "secret_access_key": 4,
        "token": 5,
        "expiration": 6,
        "last_updated": 7,
    }
