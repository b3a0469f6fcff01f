from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PutState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PUT_STATE_UNSPECIFIED: _ClassVar[PutState]
    PUT_STATE_ALLOCATED: _ClassVar[PutState]
    PUT_STATE_EXISTS: _ClassVar[PutState]
    PUT_STATE_IN_PROGRESS: _ClassVar[PutState]
    PUT_STATE_NO_SPACE: _ClassVar[PutState]
    PUT_STATE_TOO_LARGE: _ClassVar[PutState]
PUT_STATE_UNSPECIFIED: PutState
PUT_STATE_ALLOCATED: PutState
PUT_STATE_EXISTS: PutState
PUT_STATE_IN_PROGRESS: PutState
PUT_STATE_NO_SPACE: PutState
PUT_STATE_TOO_LARGE: PutState

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "host_id", "address", "segment_path", "segment_size", "tcp_address", "epoch")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_PATH_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_SIZE_FIELD_NUMBER: _ClassVar[int]
    TCP_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    host_id: str
    address: str
    segment_path: str
    segment_size: int
    tcp_address: str
    epoch: int
    def __init__(self, node_id: _Optional[str] = ..., host_id: _Optional[str] = ..., address: _Optional[str] = ..., segment_path: _Optional[str] = ..., segment_size: _Optional[int] = ..., tcp_address: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class HeldObject(_message.Message):
    __slots__ = ("key", "offset", "length")
    KEY_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    key: str
    offset: int
    length: int
    def __init__(self, key: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class RegisterNodeRequest(_message.Message):
    __slots__ = ("node", "held")
    NODE_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    node: NodeInfo
    held: _containers.RepeatedCompositeFieldContainer[HeldObject]
    def __init__(self, node: _Optional[_Union[NodeInfo, _Mapping]] = ..., held: _Optional[_Iterable[_Union[HeldObject, _Mapping]]] = ...) -> None: ...

class RegisterNodeResponse(_message.Message):
    __slots__ = ("node_timeout_s", "epoch", "grant_key", "adopted")
    NODE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    GRANT_KEY_FIELD_NUMBER: _ClassVar[int]
    ADOPTED_FIELD_NUMBER: _ClassVar[int]
    node_timeout_s: float
    epoch: int
    grant_key: bytes
    adopted: int
    def __init__(self, node_timeout_s: _Optional[float] = ..., epoch: _Optional[int] = ..., grant_key: _Optional[bytes] = ..., adopted: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "epoch")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    epoch: int
    def __init__(self, node_id: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("known",)
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    known: bool
    def __init__(self, known: _Optional[bool] = ...) -> None: ...

class Location(_message.Message):
    __slots__ = ("key", "node_id", "offset", "length", "epoch")
    KEY_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    key: str
    node_id: str
    offset: int
    length: int
    epoch: int
    def __init__(self, key: _Optional[str] = ..., node_id: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class WriteGrant(_message.Message):
    __slots__ = ("offset", "length", "epoch", "token", "expires_unix_ms", "mac")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    offset: int
    length: int
    epoch: int
    token: int
    expires_unix_ms: int
    mac: bytes
    def __init__(self, offset: _Optional[int] = ..., length: _Optional[int] = ..., epoch: _Optional[int] = ..., token: _Optional[int] = ..., expires_unix_ms: _Optional[int] = ..., mac: _Optional[bytes] = ...) -> None: ...

class KeysRequest(_message.Message):
    __slots__ = ("keys", "client_host_id")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_HOST_ID_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    client_host_id: str
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., client_host_id: _Optional[str] = ...) -> None: ...

class PutStartRequest(_message.Message):
    __slots__ = ("keys", "sizes", "client_host_id")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    CLIENT_HOST_ID_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    sizes: _containers.RepeatedScalarFieldContainer[int]
    client_host_id: str
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., sizes: _Optional[_Iterable[int]] = ..., client_host_id: _Optional[str] = ...) -> None: ...

class PutSlot(_message.Message):
    __slots__ = ("state", "location", "grant")
    STATE_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    GRANT_FIELD_NUMBER: _ClassVar[int]
    state: PutState
    location: Location
    grant: WriteGrant
    def __init__(self, state: _Optional[_Union[PutState, str]] = ..., location: _Optional[_Union[Location, _Mapping]] = ..., grant: _Optional[_Union[WriteGrant, _Mapping]] = ...) -> None: ...

class PutStartResponse(_message.Message):
    __slots__ = ("slots", "nodes", "max_object_bytes", "membership")
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    MAX_OBJECT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMBERSHIP_FIELD_NUMBER: _ClassVar[int]
    slots: _containers.RepeatedCompositeFieldContainer[PutSlot]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    max_object_bytes: int
    membership: int
    def __init__(self, slots: _Optional[_Iterable[_Union[PutSlot, _Mapping]]] = ..., nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ..., max_object_bytes: _Optional[int] = ..., membership: _Optional[int] = ...) -> None: ...

class PutTicket(_message.Message):
    __slots__ = ("key", "token")
    KEY_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    key: str
    token: int
    def __init__(self, key: _Optional[str] = ..., token: _Optional[int] = ...) -> None: ...

class PutFinishRequest(_message.Message):
    __slots__ = ("puts",)
    PUTS_FIELD_NUMBER: _ClassVar[int]
    puts: _containers.RepeatedCompositeFieldContainer[PutTicket]
    def __init__(self, puts: _Optional[_Iterable[_Union[PutTicket, _Mapping]]] = ...) -> None: ...

class PutEndResponse(_message.Message):
    __slots__ = ("sealed",)
    SEALED_FIELD_NUMBER: _ClassVar[int]
    sealed: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, sealed: _Optional[_Iterable[bool]] = ...) -> None: ...

class PutAbortResponse(_message.Message):
    __slots__ = ("aborted",)
    ABORTED_FIELD_NUMBER: _ClassVar[int]
    aborted: int
    def __init__(self, aborted: _Optional[int] = ...) -> None: ...

class Replica(_message.Message):
    __slots__ = ("found", "location")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    found: bool
    location: Location
    def __init__(self, found: _Optional[bool] = ..., location: _Optional[_Union[Location, _Mapping]] = ...) -> None: ...

class GetReplicasResponse(_message.Message):
    __slots__ = ("replicas", "nodes", "lease_ms", "membership")
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    MEMBERSHIP_FIELD_NUMBER: _ClassVar[int]
    replicas: _containers.RepeatedCompositeFieldContainer[Replica]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    lease_ms: int
    membership: int
    def __init__(self, replicas: _Optional[_Iterable[_Union[Replica, _Mapping]]] = ..., nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ..., lease_ms: _Optional[int] = ..., membership: _Optional[int] = ...) -> None: ...

class MatchPrefixResponse(_message.Message):
    __slots__ = ("matched", "locations", "nodes", "lease_ms", "membership")
    MATCHED_FIELD_NUMBER: _ClassVar[int]
    LOCATIONS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    MEMBERSHIP_FIELD_NUMBER: _ClassVar[int]
    matched: int
    locations: _containers.RepeatedCompositeFieldContainer[Location]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    lease_ms: int
    membership: int
    def __init__(self, matched: _Optional[int] = ..., locations: _Optional[_Iterable[_Union[Location, _Mapping]]] = ..., nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ..., lease_ms: _Optional[int] = ..., membership: _Optional[int] = ...) -> None: ...

class ExistsResponse(_message.Message):
    __slots__ = ("exists",)
    EXISTS_FIELD_NUMBER: _ClassVar[int]
    exists: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, exists: _Optional[_Iterable[bool]] = ...) -> None: ...

class RemoveResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: int
    def __init__(self, removed: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("node", "capacity_bytes", "used_bytes", "objects", "heartbeat_age_s")
    NODE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    node: NodeInfo
    capacity_bytes: int
    used_bytes: int
    objects: int
    heartbeat_age_s: float
    def __init__(self, node: _Optional[_Union[NodeInfo, _Mapping]] = ..., capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., objects: _Optional[int] = ..., heartbeat_age_s: _Optional[float] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("nodes", "capacity_bytes", "used_bytes", "objects", "hits", "misses", "evictions", "puts", "membership")
    NODES_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    PUTS_FIELD_NUMBER: _ClassVar[int]
    MEMBERSHIP_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    capacity_bytes: int
    used_bytes: int
    objects: int
    hits: int
    misses: int
    evictions: int
    puts: int
    membership: int
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ..., capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., objects: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., evictions: _Optional[int] = ..., puts: _Optional[int] = ..., membership: _Optional[int] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("prefix", "limit")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    limit: int
    def __init__(self, prefix: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ObjectInfo(_message.Message):
    __slots__ = ("location", "sealed", "leased")
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    SEALED_FIELD_NUMBER: _ClassVar[int]
    LEASED_FIELD_NUMBER: _ClassVar[int]
    location: Location
    sealed: bool
    leased: bool
    def __init__(self, location: _Optional[_Union[Location, _Mapping]] = ..., sealed: _Optional[bool] = ..., leased: _Optional[bool] = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("objects", "truncated")
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    objects: _containers.RepeatedCompositeFieldContainer[ObjectInfo]
    truncated: bool
    def __init__(self, objects: _Optional[_Iterable[_Union[ObjectInfo, _Mapping]]] = ..., truncated: _Optional[bool] = ...) -> None: ...

class EvictRequest(_message.Message):
    __slots__ = ("bytes", "prefix", "all")
    BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    prefix: str
    all: bool
    def __init__(self, bytes: _Optional[int] = ..., prefix: _Optional[str] = ..., all: _Optional[bool] = ...) -> None: ...

class EvictResponse(_message.Message):
    __slots__ = ("evicted", "bytes")
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    evicted: int
    bytes: int
    def __init__(self, evicted: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class WriteOp(_message.Message):
    __slots__ = ("data", "grant")
    DATA_FIELD_NUMBER: _ClassVar[int]
    GRANT_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    grant: WriteGrant
    def __init__(self, data: _Optional[bytes] = ..., grant: _Optional[_Union[WriteGrant, _Mapping]] = ...) -> None: ...

class WriteRequest(_message.Message):
    __slots__ = ("ops",)
    OPS_FIELD_NUMBER: _ClassVar[int]
    ops: _containers.RepeatedCompositeFieldContainer[WriteOp]
    def __init__(self, ops: _Optional[_Iterable[_Union[WriteOp, _Mapping]]] = ...) -> None: ...

class WriteResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReadOp(_message.Message):
    __slots__ = ("offset", "length")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    offset: int
    length: int
    def __init__(self, offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class ReadRequest(_message.Message):
    __slots__ = ("ops", "epoch")
    OPS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ops: _containers.RepeatedCompositeFieldContainer[ReadOp]
    epoch: int
    def __init__(self, ops: _Optional[_Iterable[_Union[ReadOp, _Mapping]]] = ..., epoch: _Optional[int] = ...) -> None: ...

class ReadResponse(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, data: _Optional[_Iterable[bytes]] = ...) -> None: ...
