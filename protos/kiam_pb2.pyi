from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetPodCredentialsRequest(_message.Message):
    __slots__ = ("ip", "role")
    IP_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ip: str
    role: str
    def __init__(self, ip: _Optional[str] = ..., role: _Optional[str] = ...) -> None: ...

class GetPodRoleRequest(_message.Message):
    __slots__ = ("ip",)
    IP_FIELD_NUMBER: _ClassVar[int]
    ip: str
    def __init__(self, ip: _Optional[str] = ...) -> None: ...

class Role(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class Credentials(_message.Message):
    __slots__ = ("code", "type", "access_key_id", "secret_access_key", "token", "expiration", "last_updated")
    CODE_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    ACCESS_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SECRET_ACCESS_KEY_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRATION_FIELD_NUMBER: _ClassVar[int]
    LAST_UPDATED_FIELD_NUMBER: _ClassVar[int]
    code: str
    type: str
    access_key_id: str
    secret_access_key: str
    token: str
    expiration: str
    last_updated: str
    def __init__(self, code: _Optional[str] = ..., type: _Optional[str] = ..., access_key_id: _Optional[str] = ..., secret_access_key: _Optional[str] = ..., token: _Optional[str] = ..., expiration: _Optional[str] = ..., last_updated: _Optional[str] = ...) -> None: ...

class GetHealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthStatus(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...

class WatchNodeRequest(_message.Message):
    __slots__ = ("host_ip",)
    HOST_IP_FIELD_NUMBER: _ClassVar[int]
    host_ip: str
    def __init__(self, host_ip: _Optional[str] = ...) -> None: ...

class PodState(_message.Message):
    __slots__ = ("ip", "role", "identity", "denied", "role_arn", "reason", "uid")
    IP_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    DENIED_FIELD_NUMBER: _ClassVar[int]
    ROLE_ARN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    ip: str
    role: str
    identity: str
    denied: str
    role_arn: str
    reason: str
    uid: str
    def __init__(self, ip: _Optional[str] = ..., role: _Optional[str] = ..., identity: _Optional[str] = ..., denied: _Optional[str] = ..., role_arn: _Optional[str] = ..., reason: _Optional[str] = ..., uid: _Optional[str] = ...) -> None: ...

class IdentityCredentials(_message.Message):
    __slots__ = ("identity", "credentials")
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    identity: str
    credentials: Credentials
    def __init__(self, identity: _Optional[str] = ..., credentials: _Optional[_Union[Credentials, _Mapping]] = ...) -> None: ...

class NodeUpdate(_message.Message):
    __slots__ = ("reset", "pods", "removed_ips", "credentials", "removed_identities", "synced")
    RESET_FIELD_NUMBER: _ClassVar[int]
    PODS_FIELD_NUMBER: _ClassVar[int]
    REMOVED_IPS_FIELD_NUMBER: _ClassVar[int]
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    REMOVED_IDENTITIES_FIELD_NUMBER: _ClassVar[int]
    SYNCED_FIELD_NUMBER: _ClassVar[int]
    reset: bool
    pods: _containers.RepeatedCompositeFieldContainer[PodState]
    removed_ips: _containers.RepeatedScalarFieldContainer[str]
    credentials: _containers.RepeatedCompositeFieldContainer[IdentityCredentials]
    removed_identities: _containers.RepeatedScalarFieldContainer[str]
    synced: bool
    def __init__(self, reset: _Optional[bool] = ..., pods: _Optional[_Iterable[_Union[PodState, _Mapping]]] = ..., removed_ips: _Optional[_Iterable[str]] = ..., credentials: _Optional[_Iterable[_Union[IdentityCredentials, _Mapping]]] = ..., removed_identities: _Optional[_Iterable[str]] = ..., synced: _Optional[bool] = ...) -> None: ...

class NodeReadyReport(_message.Message):
    __slots__ = ("node_name", "host_ip", "redirect_installed", "snapshot_applied")
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    HOST_IP_FIELD_NUMBER: _ClassVar[int]
    REDIRECT_INSTALLED_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_APPLIED_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    host_ip: str
    redirect_installed: bool
    snapshot_applied: bool
    def __init__(self, node_name: _Optional[str] = ..., host_ip: _Optional[str] = ..., redirect_installed: _Optional[bool] = ..., snapshot_applied: _Optional[bool] = ...) -> None: ...

class NodeReadyAnswer(_message.Message):
    __slots__ = ("outcome", "message")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    outcome: str
    message: str
    def __init__(self, outcome: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class TokenCredentialsRequest(_message.Message):
    __slots__ = ("token",)
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    token: str
    def __init__(self, token: _Optional[str] = ...) -> None: ...

class TokenCredentials(_message.Message):
    __slots__ = ("credentials", "namespace", "name", "uid", "ip", "identity", "token_expires")
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    TOKEN_EXPIRES_FIELD_NUMBER: _ClassVar[int]
    credentials: Credentials
    namespace: str
    name: str
    uid: str
    ip: str
    identity: str
    token_expires: int
    def __init__(self, credentials: _Optional[_Union[Credentials, _Mapping]] = ..., namespace: _Optional[str] = ..., name: _Optional[str] = ..., uid: _Optional[str] = ..., ip: _Optional[str] = ..., identity: _Optional[str] = ..., token_expires: _Optional[int] = ...) -> None: ...

class ExplainPodRequest(_message.Message):
    __slots__ = ("namespace", "name")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    name: str
    def __init__(self, namespace: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class ExplanationStep(_message.Message):
    __slots__ = ("check", "outcome", "detail")
    CHECK_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    check: str
    outcome: str
    detail: str
    def __init__(self, check: _Optional[str] = ..., outcome: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class PodExplanation(_message.Message):
    __slots__ = ("steps", "served", "answer", "fix", "reason")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SERVED_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    FIX_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedCompositeFieldContainer[ExplanationStep]
    served: bool
    answer: str
    fix: str
    reason: str
    def __init__(self, steps: _Optional[_Iterable[_Union[ExplanationStep, _Mapping]]] = ..., served: _Optional[bool] = ..., answer: _Optional[str] = ..., fix: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...
