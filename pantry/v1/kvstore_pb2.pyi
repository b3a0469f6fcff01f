from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TierOp(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_OP_UNSPECIFIED: _ClassVar[TierOp]
    TIER_OP_SPILL: _ClassVar[TierOp]
    TIER_OP_PROMOTE: _ClassVar[TierOp]
    TIER_OP_DROP: _ClassVar[TierOp]

class PutState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PUT_STATE_UNSPECIFIED: _ClassVar[PutState]
    PUT_STATE_ALLOCATED: _ClassVar[PutState]
    PUT_STATE_EXISTS: _ClassVar[PutState]
    PUT_STATE_IN_PROGRESS: _ClassVar[PutState]
    PUT_STATE_NO_SPACE: _ClassVar[PutState]
    PUT_STATE_TOO_LARGE: _ClassVar[PutState]
    PUT_STATE_GONE: _ClassVar[PutState]
TIER_OP_UNSPECIFIED: TierOp
TIER_OP_SPILL: TierOp
TIER_OP_PROMOTE: TierOp
TIER_OP_DROP: TierOp
PUT_STATE_UNSPECIFIED: PutState
PUT_STATE_ALLOCATED: PutState
PUT_STATE_EXISTS: PutState
PUT_STATE_IN_PROGRESS: PutState
PUT_STATE_NO_SPACE: PutState
PUT_STATE_TOO_LARGE: PutState
PUT_STATE_GONE: PutState

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "host_id", "address", "segment_path", "segment_size", "tcp_address", "epoch", "ssd_dir", "ssd_bytes")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_PATH_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_SIZE_FIELD_NUMBER: _ClassVar[int]
    TCP_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SSD_DIR_FIELD_NUMBER: _ClassVar[int]
    SSD_BYTES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    host_id: str
    address: str
    segment_path: str
    segment_size: int
    tcp_address: str
    epoch: int
    ssd_dir: str
    ssd_bytes: int
    def __init__(self, node_id: _Optional[str] = ..., host_id: _Optional[str] = ..., address: _Optional[str] = ..., segment_path: _Optional[str] = ..., segment_size: _Optional[int] = ..., tcp_address: _Optional[str] = ..., epoch: _Optional[int] = ..., ssd_dir: _Optional[str] = ..., ssd_bytes: _Optional[int] = ...) -> None: ...

class HeldObject(_message.Message):
    __slots__ = ("key", "offset", "length", "tier")
    KEY_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    key: str
    offset: int
    length: int
    tier: str
    def __init__(self, key: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., tier: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("node_id", "epoch", "tiers")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    epoch: int
    tiers: TierReport
    def __init__(self, node_id: _Optional[str] = ..., epoch: _Optional[int] = ..., tiers: _Optional[_Union[TierReport, _Mapping]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("known", "orders")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    ORDERS_FIELD_NUMBER: _ClassVar[int]
    known: bool
    orders: _containers.RepeatedCompositeFieldContainer[TierOrder]
    def __init__(self, known: _Optional[bool] = ..., orders: _Optional[_Iterable[_Union[TierOrder, _Mapping]]] = ...) -> None: ...

class TierOrder(_message.Message):
    __slots__ = ("op", "key", "offset", "length", "token")
    OP_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    op: TierOp
    key: str
    offset: int
    length: int
    token: int
    def __init__(self, op: _Optional[_Union[TierOp, str]] = ..., key: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., token: _Optional[int] = ...) -> None: ...

class TierDone(_message.Message):
    __slots__ = ("op", "key", "token", "ok", "length")
    OP_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    op: TierOp
    key: str
    token: int
    ok: bool
    length: int
    def __init__(self, op: _Optional[_Union[TierOp, str]] = ..., key: _Optional[str] = ..., token: _Optional[int] = ..., ok: _Optional[bool] = ..., length: _Optional[int] = ...) -> None: ...

class TierReport(_message.Message):
    __slots__ = ("done", "ssd_dropped")
    DONE_FIELD_NUMBER: _ClassVar[int]
    SSD_DROPPED_FIELD_NUMBER: _ClassVar[int]
    done: _containers.RepeatedCompositeFieldContainer[TierDone]
    ssd_dropped: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, done: _Optional[_Iterable[_Union[TierDone, _Mapping]]] = ..., ssd_dropped: _Optional[_Iterable[str]] = ...) -> None: ...

class Location(_message.Message):
    __slots__ = ("key", "node_id", "offset", "length", "epoch", "tier")
    KEY_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    key: str
    node_id: str
    offset: int
    length: int
    epoch: int
    tier: str
    def __init__(self, key: _Optional[str] = ..., node_id: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., epoch: _Optional[int] = ..., tier: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("keys", "client_host_id", "packed_keys", "compact", "exclude_nodes", "packed_columns")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_HOST_ID_FIELD_NUMBER: _ClassVar[int]
    PACKED_KEYS_FIELD_NUMBER: _ClassVar[int]
    COMPACT_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_NODES_FIELD_NUMBER: _ClassVar[int]
    PACKED_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    client_host_id: str
    packed_keys: bytes
    compact: bool
    exclude_nodes: _containers.RepeatedScalarFieldContainer[str]
    packed_columns: bool
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., client_host_id: _Optional[str] = ..., packed_keys: _Optional[bytes] = ..., compact: _Optional[bool] = ..., exclude_nodes: _Optional[_Iterable[str]] = ..., packed_columns: _Optional[bool] = ...) -> None: ...

class PutStartRequest(_message.Message):
    __slots__ = ("keys", "sizes", "client_host_id", "replicas", "replace_node")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    CLIENT_HOST_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    REPLACE_NODE_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    sizes: _containers.RepeatedScalarFieldContainer[int]
    client_host_id: str
    replicas: int
    replace_node: str
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., sizes: _Optional[_Iterable[int]] = ..., client_host_id: _Optional[str] = ..., replicas: _Optional[int] = ..., replace_node: _Optional[str] = ...) -> None: ...

class PutSlot(_message.Message):
    __slots__ = ("state", "location", "grant", "replicas", "wanted")
    STATE_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    GRANT_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    WANTED_FIELD_NUMBER: _ClassVar[int]
    state: PutState
    location: Location
    grant: WriteGrant
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaGrant]
    wanted: int
    def __init__(self, state: _Optional[_Union[PutState, str]] = ..., location: _Optional[_Union[Location, _Mapping]] = ..., grant: _Optional[_Union[WriteGrant, _Mapping]] = ..., replicas: _Optional[_Iterable[_Union[ReplicaGrant, _Mapping]]] = ..., wanted: _Optional[int] = ...) -> None: ...

class ReplicaGrant(_message.Message):
    __slots__ = ("location", "grant")
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    GRANT_FIELD_NUMBER: _ClassVar[int]
    location: Location
    grant: WriteGrant
    def __init__(self, location: _Optional[_Union[Location, _Mapping]] = ..., grant: _Optional[_Union[WriteGrant, _Mapping]] = ...) -> None: ...

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
    __slots__ = ("key", "token", "node_id")
    KEY_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    key: str
    token: int
    node_id: str
    def __init__(self, key: _Optional[str] = ..., token: _Optional[int] = ..., node_id: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("matched", "locations", "nodes", "lease_ms", "membership", "node_index", "offsets", "lengths", "epochs", "tier_names", "tiers", "node_index_packed", "offsets_packed", "lengths_packed")
    MATCHED_FIELD_NUMBER: _ClassVar[int]
    LOCATIONS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    MEMBERSHIP_FIELD_NUMBER: _ClassVar[int]
    NODE_INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    TIER_NAMES_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    NODE_INDEX_PACKED_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_PACKED_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_PACKED_FIELD_NUMBER: _ClassVar[int]
    matched: int
    locations: _containers.RepeatedCompositeFieldContainer[Location]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    lease_ms: int
    membership: int
    node_index: _containers.RepeatedScalarFieldContainer[int]
    offsets: _containers.RepeatedScalarFieldContainer[int]
    lengths: _containers.RepeatedScalarFieldContainer[int]
    epochs: _containers.RepeatedScalarFieldContainer[int]
    tier_names: _containers.RepeatedScalarFieldContainer[str]
    tiers: _containers.RepeatedScalarFieldContainer[int]
    node_index_packed: bytes
    offsets_packed: bytes
    lengths_packed: bytes
    def __init__(self, matched: _Optional[int] = ..., locations: _Optional[_Iterable[_Union[Location, _Mapping]]] = ..., nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ..., lease_ms: _Optional[int] = ..., membership: _Optional[int] = ..., node_index: _Optional[_Iterable[int]] = ..., offsets: _Optional[_Iterable[int]] = ..., lengths: _Optional[_Iterable[int]] = ..., epochs: _Optional[_Iterable[int]] = ..., tier_names: _Optional[_Iterable[str]] = ..., tiers: _Optional[_Iterable[int]] = ..., node_index_packed: _Optional[bytes] = ..., offsets_packed: _Optional[bytes] = ..., lengths_packed: _Optional[bytes] = ...) -> None: ...

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
    __slots__ = ("node", "capacity_bytes", "used_bytes", "objects", "heartbeat_age_s", "draining", "ssd_used_bytes", "ssd_objects")
    NODE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    SSD_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    SSD_OBJECTS_FIELD_NUMBER: _ClassVar[int]
    node: NodeInfo
    capacity_bytes: int
    used_bytes: int
    objects: int
    heartbeat_age_s: float
    draining: bool
    ssd_used_bytes: int
    ssd_objects: int
    def __init__(self, node: _Optional[_Union[NodeInfo, _Mapping]] = ..., capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., objects: _Optional[int] = ..., heartbeat_age_s: _Optional[float] = ..., draining: _Optional[bool] = ..., ssd_used_bytes: _Optional[int] = ..., ssd_objects: _Optional[int] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("nodes", "capacity_bytes", "used_bytes", "objects", "hits", "misses", "evictions", "puts", "membership", "leader_address", "role")
    NODES_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    PUTS_FIELD_NUMBER: _ClassVar[int]
    MEMBERSHIP_FIELD_NUMBER: _ClassVar[int]
    LEADER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    capacity_bytes: int
    used_bytes: int
    objects: int
    hits: int
    misses: int
    evictions: int
    puts: int
    membership: int
    leader_address: str
    role: str
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ..., capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., objects: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., evictions: _Optional[int] = ..., puts: _Optional[int] = ..., membership: _Optional[int] = ..., leader_address: _Optional[str] = ..., role: _Optional[str] = ...) -> None: ...

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

class DrainRequest(_message.Message):
    __slots__ = ("node_id", "limit", "drop", "cancel")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    DROP_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    limit: int
    drop: _containers.RepeatedScalarFieldContainer[str]
    cancel: bool
    def __init__(self, node_id: _Optional[str] = ..., limit: _Optional[int] = ..., drop: _Optional[_Iterable[str]] = ..., cancel: _Optional[bool] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("keys", "replicas", "dropped", "draining")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    replicas: int
    dropped: int
    draining: bool
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., replicas: _Optional[int] = ..., dropped: _Optional[int] = ..., draining: _Optional[bool] = ...) -> None: ...

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
    __slots__ = ("offset", "length", "key", "tier")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    offset: int
    length: int
    key: str
    tier: str
    def __init__(self, offset: _Optional[int] = ..., length: _Optional[int] = ..., key: _Optional[str] = ..., tier: _Optional[str] = ...) -> None: ...

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

class RdmaEndpoint(_message.Message):
    __slots__ = ("qpn", "psn", "lid", "gid", "mtu")
    QPN_FIELD_NUMBER: _ClassVar[int]
    PSN_FIELD_NUMBER: _ClassVar[int]
    LID_FIELD_NUMBER: _ClassVar[int]
    GID_FIELD_NUMBER: _ClassVar[int]
    MTU_FIELD_NUMBER: _ClassVar[int]
    qpn: int
    psn: int
    lid: int
    gid: bytes
    mtu: int
    def __init__(self, qpn: _Optional[int] = ..., psn: _Optional[int] = ..., lid: _Optional[int] = ..., gid: _Optional[bytes] = ..., mtu: _Optional[int] = ...) -> None: ...

class RdmaConnectRequest(_message.Message):
    __slots__ = ("client", "epoch")
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    client: RdmaEndpoint
    epoch: int
    def __init__(self, client: _Optional[_Union[RdmaEndpoint, _Mapping]] = ..., epoch: _Optional[int] = ...) -> None: ...

class RdmaConnectResponse(_message.Message):
    __slots__ = ("node", "addr", "rkey", "length")
    NODE_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    RKEY_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    node: RdmaEndpoint
    addr: int
    rkey: int
    length: int
    def __init__(self, node: _Optional[_Union[RdmaEndpoint, _Mapping]] = ..., addr: _Optional[int] = ..., rkey: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ("from_seq", "prefix", "run_id")
    FROM_SEQ_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    from_seq: int
    prefix: str
    run_id: str
    def __init__(self, from_seq: _Optional[int] = ..., prefix: _Optional[str] = ..., run_id: _Optional[str] = ...) -> None: ...

class PoolEvent(_message.Message):
    __slots__ = ("seq", "run_id", "kind", "key", "node_id", "tier", "gap", "time")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    GAP_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    seq: int
    run_id: str
    kind: str
    key: str
    node_id: str
    tier: str
    gap: int
    time: float
    def __init__(self, seq: _Optional[int] = ..., run_id: _Optional[str] = ..., kind: _Optional[str] = ..., key: _Optional[str] = ..., node_id: _Optional[str] = ..., tier: _Optional[str] = ..., gap: _Optional[int] = ..., time: _Optional[float] = ...) -> None: ...
