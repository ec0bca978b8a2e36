from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EnrollRequest(_message.Message):
    __slots__ = ("token", "peer_id", "csr_pem")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    token: str
    peer_id: str
    csr_pem: bytes
    def __init__(self, token: _Optional[str] = ..., peer_id: _Optional[str] = ..., csr_pem: _Optional[bytes] = ...) -> None: ...

class EnrollReply(_message.Message):
    __slots__ = ("cert_pem", "ca_pem", "run_id")
    CERT_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_PEM_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    cert_pem: bytes
    ca_pem: bytes
    run_id: str
    def __init__(self, cert_pem: _Optional[bytes] = ..., ca_pem: _Optional[bytes] = ..., run_id: _Optional[str] = ...) -> None: ...

class Capabilities(_message.Message):
    __slots__ = ("device", "flops", "bandwidth_bytes_per_s", "memory_bytes")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    FLOPS_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    device: str
    flops: float
    bandwidth_bytes_per_s: float
    memory_bytes: int
    def __init__(self, device: _Optional[str] = ..., flops: _Optional[float] = ..., bandwidth_bytes_per_s: _Optional[float] = ..., memory_bytes: _Optional[int] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("step", "loss", "tokens_per_s", "stage_grad_norms", "has_checkpoint", "checkpoint_round", "upload_bytes_per_s")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    STAGE_GRAD_NORMS_FIELD_NUMBER: _ClassVar[int]
    HAS_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_ROUND_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    step: int
    loss: float
    tokens_per_s: float
    stage_grad_norms: _containers.RepeatedScalarFieldContainer[float]
    has_checkpoint: bool
    checkpoint_round: int
    upload_bytes_per_s: float
    def __init__(self, step: _Optional[int] = ..., loss: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., stage_grad_norms: _Optional[_Iterable[float]] = ..., has_checkpoint: _Optional[bool] = ..., checkpoint_round: _Optional[int] = ..., upload_bytes_per_s: _Optional[float] = ...) -> None: ...

class Member(_message.Message):
    __slots__ = ("peer_id", "address", "capabilities", "unreachable")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    address: str
    capabilities: Capabilities
    unreachable: bool
    def __init__(self, peer_id: _Optional[str] = ..., address: _Optional[str] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ..., unreachable: _Optional[bool] = ...) -> None: ...

class Attempt(_message.Message):
    __slots__ = ("number", "members", "deadline_in_s", "norms", "aggregate", "roster", "base_roster", "removed")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_IN_S_FIELD_NUMBER: _ClassVar[int]
    NORMS_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_FIELD_NUMBER: _ClassVar[int]
    ROSTER_FIELD_NUMBER: _ClassVar[int]
    BASE_ROSTER_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    number: int
    members: _containers.RepeatedCompositeFieldContainer[Member]
    deadline_in_s: float
    norms: _containers.RepeatedScalarFieldContainer[float]
    aggregate: str
    roster: str
    base_roster: str
    removed: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, number: _Optional[int] = ..., members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., deadline_in_s: _Optional[float] = ..., norms: _Optional[_Iterable[float]] = ..., aggregate: _Optional[str] = ..., roster: _Optional[str] = ..., base_roster: _Optional[str] = ..., removed: _Optional[_Iterable[str]] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("run_id", "peer_id", "protocol_version", "address", "capabilities", "stage", "incarnation", "any_stage", "no_inbound", "state_hash", "shard_auto")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    ANY_STAGE_FIELD_NUMBER: _ClassVar[int]
    NO_INBOUND_FIELD_NUMBER: _ClassVar[int]
    STATE_HASH_FIELD_NUMBER: _ClassVar[int]
    SHARD_AUTO_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    peer_id: str
    protocol_version: int
    address: str
    capabilities: Capabilities
    stage: int
    incarnation: str
    any_stage: bool
    no_inbound: bool
    state_hash: str
    shard_auto: bool
    def __init__(self, run_id: _Optional[str] = ..., peer_id: _Optional[str] = ..., protocol_version: _Optional[int] = ..., address: _Optional[str] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ..., stage: _Optional[int] = ..., incarnation: _Optional[str] = ..., any_stage: _Optional[bool] = ..., no_inbound: _Optional[bool] = ..., state_hash: _Optional[str] = ..., shard_auto: _Optional[bool] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("lease_s", "heartbeat_interval_s", "next_round", "has_committed", "last_committed_round", "last_committed_hash", "reason", "donor", "stage", "recover", "neighbours", "stages", "address", "reachable", "relay", "state_lost", "shard_index", "shard_count", "declare_norms", "crl_pem")
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    NEXT_ROUND_FIELD_NUMBER: _ClassVar[int]
    HAS_COMMITTED_FIELD_NUMBER: _ClassVar[int]
    LAST_COMMITTED_ROUND_FIELD_NUMBER: _ClassVar[int]
    LAST_COMMITTED_HASH_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DONOR_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    RECOVER_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REACHABLE_FIELD_NUMBER: _ClassVar[int]
    RELAY_FIELD_NUMBER: _ClassVar[int]
    STATE_LOST_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    SHARD_COUNT_FIELD_NUMBER: _ClassVar[int]
    DECLARE_NORMS_FIELD_NUMBER: _ClassVar[int]
    CRL_PEM_FIELD_NUMBER: _ClassVar[int]
    lease_s: float
    heartbeat_interval_s: float
    next_round: int
    has_committed: bool
    last_committed_round: int
    last_committed_hash: str
    reason: str
    donor: Member
    stage: int
    recover: bool
    neighbours: _containers.RepeatedCompositeFieldContainer[Member]
    stages: int
    address: str
    reachable: bool
    relay: str
    state_lost: bool
    shard_index: int
    shard_count: int
    declare_norms: bool
    crl_pem: bytes
    def __init__(self, lease_s: _Optional[float] = ..., heartbeat_interval_s: _Optional[float] = ..., next_round: _Optional[int] = ..., has_committed: _Optional[bool] = ..., last_committed_round: _Optional[int] = ..., last_committed_hash: _Optional[str] = ..., reason: _Optional[str] = ..., donor: _Optional[_Union[Member, _Mapping]] = ..., stage: _Optional[int] = ..., recover: _Optional[bool] = ..., neighbours: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., stages: _Optional[int] = ..., address: _Optional[str] = ..., reachable: _Optional[bool] = ..., relay: _Optional[str] = ..., state_lost: _Optional[bool] = ..., shard_index: _Optional[int] = ..., shard_count: _Optional[int] = ..., declare_norms: _Optional[bool] = ..., crl_pem: _Optional[bytes] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("run_id", "peer_id", "incarnation", "progress", "crl_digest")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    CRL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    peer_id: str
    incarnation: str
    progress: Progress
    crl_digest: str
    def __init__(self, run_id: _Optional[str] = ..., peer_id: _Optional[str] = ..., incarnation: _Optional[str] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., crl_digest: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("lease_expires_in_s", "move", "move_to_stage", "heartbeat_interval_s", "crl_pem", "crl_changed")
    LEASE_EXPIRES_IN_S_FIELD_NUMBER: _ClassVar[int]
    MOVE_FIELD_NUMBER: _ClassVar[int]
    MOVE_TO_STAGE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    CRL_PEM_FIELD_NUMBER: _ClassVar[int]
    CRL_CHANGED_FIELD_NUMBER: _ClassVar[int]
    lease_expires_in_s: float
    move: bool
    move_to_stage: int
    heartbeat_interval_s: float
    crl_pem: bytes
    crl_changed: bool
    def __init__(self, lease_expires_in_s: _Optional[float] = ..., move: _Optional[bool] = ..., move_to_stage: _Optional[int] = ..., heartbeat_interval_s: _Optional[float] = ..., crl_pem: _Optional[bytes] = ..., crl_changed: _Optional[bool] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("run_id", "peer_id", "incarnation", "reason")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    peer_id: str
    incarnation: str
    reason: str
    def __init__(self, run_id: _Optional[str] = ..., peer_id: _Optional[str] = ..., incarnation: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class RendezvousRequest(_message.Message):
    __slots__ = ("run_id", "peer_id", "incarnation", "stage", "round", "wait_s", "state_hash", "contribution_norm", "known_roster", "payload_bytes")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    STATE_HASH_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_NORM_FIELD_NUMBER: _ClassVar[int]
    KNOWN_ROSTER_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    peer_id: str
    incarnation: str
    stage: int
    round: int
    wait_s: float
    state_hash: str
    contribution_norm: float
    known_roster: str
    payload_bytes: int
    def __init__(self, run_id: _Optional[str] = ..., peer_id: _Optional[str] = ..., incarnation: _Optional[str] = ..., stage: _Optional[int] = ..., round: _Optional[int] = ..., wait_s: _Optional[float] = ..., state_hash: _Optional[str] = ..., contribution_norm: _Optional[float] = ..., known_roster: _Optional[str] = ..., payload_bytes: _Optional[int] = ...) -> None: ...

class RendezvousReply(_message.Message):
    __slots__ = ("outcome", "attempt", "next_round", "reason", "donor", "has_committed", "last_committed_round", "last_committed_hash", "refused")
    class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OUTCOME_UNSPECIFIED: _ClassVar[RendezvousReply.Outcome]
        STARTED: _ClassVar[RendezvousReply.Outcome]
        WAITING: _ClassVar[RendezvousReply.Outcome]
        MISSED: _ClassVar[RendezvousReply.Outcome]
        ABORTED: _ClassVar[RendezvousReply.Outcome]
    OUTCOME_UNSPECIFIED: RendezvousReply.Outcome
    STARTED: RendezvousReply.Outcome
    WAITING: RendezvousReply.Outcome
    MISSED: RendezvousReply.Outcome
    ABORTED: RendezvousReply.Outcome
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    NEXT_ROUND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DONOR_FIELD_NUMBER: _ClassVar[int]
    HAS_COMMITTED_FIELD_NUMBER: _ClassVar[int]
    LAST_COMMITTED_ROUND_FIELD_NUMBER: _ClassVar[int]
    LAST_COMMITTED_HASH_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    outcome: RendezvousReply.Outcome
    attempt: Attempt
    next_round: int
    reason: str
    donor: Member
    has_committed: bool
    last_committed_round: int
    last_committed_hash: str
    refused: bool
    def __init__(self, outcome: _Optional[_Union[RendezvousReply.Outcome, str]] = ..., attempt: _Optional[_Union[Attempt, _Mapping]] = ..., next_round: _Optional[int] = ..., reason: _Optional[str] = ..., donor: _Optional[_Union[Member, _Mapping]] = ..., has_committed: _Optional[bool] = ..., last_committed_round: _Optional[int] = ..., last_committed_hash: _Optional[str] = ..., refused: _Optional[bool] = ...) -> None: ...

class ReportFailureRequest(_message.Message):
    __slots__ = ("run_id", "peer_id", "incarnation", "stage", "round", "attempt", "suspect", "reason", "wait_s")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SUSPECT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    peer_id: str
    incarnation: str
    stage: int
    round: int
    attempt: int
    suspect: str
    reason: str
    wait_s: float
    def __init__(self, run_id: _Optional[str] = ..., peer_id: _Optional[str] = ..., incarnation: _Optional[str] = ..., stage: _Optional[int] = ..., round: _Optional[int] = ..., attempt: _Optional[int] = ..., suspect: _Optional[str] = ..., reason: _Optional[str] = ..., wait_s: _Optional[float] = ...) -> None: ...

class ReportFailureReply(_message.Message):
    __slots__ = ("outcome", "attempt", "reason")
    class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OUTCOME_UNSPECIFIED: _ClassVar[ReportFailureReply.Outcome]
        RETRY: _ClassVar[ReportFailureReply.Outcome]
        ABORTED: _ClassVar[ReportFailureReply.Outcome]
        COMMITTED: _ClassVar[ReportFailureReply.Outcome]
        WAITING: _ClassVar[ReportFailureReply.Outcome]
    OUTCOME_UNSPECIFIED: ReportFailureReply.Outcome
    RETRY: ReportFailureReply.Outcome
    ABORTED: ReportFailureReply.Outcome
    COMMITTED: ReportFailureReply.Outcome
    WAITING: ReportFailureReply.Outcome
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    outcome: ReportFailureReply.Outcome
    attempt: Attempt
    reason: str
    def __init__(self, outcome: _Optional[_Union[ReportFailureReply.Outcome, str]] = ..., attempt: _Optional[_Union[Attempt, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class CommitRoundRequest(_message.Message):
    __slots__ = ("run_id", "peer_id", "incarnation", "stage", "round", "attempt", "state_hash", "wait_s", "dots", "mean_sq", "all_parts")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    STATE_HASH_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    DOTS_FIELD_NUMBER: _ClassVar[int]
    MEAN_SQ_FIELD_NUMBER: _ClassVar[int]
    ALL_PARTS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    peer_id: str
    incarnation: str
    stage: int
    round: int
    attempt: int
    state_hash: str
    wait_s: float
    dots: _containers.RepeatedScalarFieldContainer[float]
    mean_sq: float
    all_parts: bool
    def __init__(self, run_id: _Optional[str] = ..., peer_id: _Optional[str] = ..., incarnation: _Optional[str] = ..., stage: _Optional[int] = ..., round: _Optional[int] = ..., attempt: _Optional[int] = ..., state_hash: _Optional[str] = ..., wait_s: _Optional[float] = ..., dots: _Optional[_Iterable[float]] = ..., mean_sq: _Optional[float] = ..., all_parts: _Optional[bool] = ...) -> None: ...

class CommitRoundReply(_message.Message):
    __slots__ = ("outcome", "donor", "attempt", "committed_hash", "reason")
    class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OUTCOME_UNSPECIFIED: _ClassVar[CommitRoundReply.Outcome]
        OK: _ClassVar[CommitRoundReply.Outcome]
        DIVERGED: _ClassVar[CommitRoundReply.Outcome]
        RETRY: _ClassVar[CommitRoundReply.Outcome]
        ABORTED: _ClassVar[CommitRoundReply.Outcome]
        WAITING: _ClassVar[CommitRoundReply.Outcome]
    OUTCOME_UNSPECIFIED: CommitRoundReply.Outcome
    OK: CommitRoundReply.Outcome
    DIVERGED: CommitRoundReply.Outcome
    RETRY: CommitRoundReply.Outcome
    ABORTED: CommitRoundReply.Outcome
    WAITING: CommitRoundReply.Outcome
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    DONOR_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_HASH_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    outcome: CommitRoundReply.Outcome
    donor: Member
    attempt: Attempt
    committed_hash: str
    reason: str
    def __init__(self, outcome: _Optional[_Union[CommitRoundReply.Outcome, str]] = ..., donor: _Optional[_Union[Member, _Mapping]] = ..., attempt: _Optional[_Union[Attempt, _Mapping]] = ..., committed_hash: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class MemberStatus(_message.Message):
    __slots__ = ("member", "stage", "lease_expires_in_s", "joined_ago_s", "progress", "quarantined")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_IN_S_FIELD_NUMBER: _ClassVar[int]
    JOINED_AGO_S_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    member: Member
    stage: int
    lease_expires_in_s: float
    joined_ago_s: float
    progress: Progress
    quarantined: str
    def __init__(self, member: _Optional[_Union[Member, _Mapping]] = ..., stage: _Optional[int] = ..., lease_expires_in_s: _Optional[float] = ..., joined_ago_s: _Optional[float] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., quarantined: _Optional[str] = ...) -> None: ...

class RoundStatus(_message.Message):
    __slots__ = ("stage", "round", "phase", "attempt", "members", "arrived", "commits", "committed_hash", "diverged", "reasons")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    ARRIVED_FIELD_NUMBER: _ClassVar[int]
    COMMITS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_HASH_FIELD_NUMBER: _ClassVar[int]
    DIVERGED_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    stage: int
    round: int
    phase: str
    attempt: int
    members: _containers.RepeatedScalarFieldContainer[str]
    arrived: _containers.RepeatedScalarFieldContainer[str]
    commits: int
    committed_hash: str
    diverged: _containers.RepeatedScalarFieldContainer[str]
    reasons: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, stage: _Optional[int] = ..., round: _Optional[int] = ..., phase: _Optional[str] = ..., attempt: _Optional[int] = ..., members: _Optional[_Iterable[str]] = ..., arrived: _Optional[_Iterable[str]] = ..., commits: _Optional[int] = ..., committed_hash: _Optional[str] = ..., diverged: _Optional[_Iterable[str]] = ..., reasons: _Optional[_Iterable[str]] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("ago_s", "reason")
    AGO_S_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ago_s: float
    reason: str
    def __init__(self, ago_s: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("run_id", "protocol_version", "members", "rounds", "events", "uptime_s", "lost_stages")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    LOST_STAGES_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    protocol_version: int
    members: _containers.RepeatedCompositeFieldContainer[MemberStatus]
    rounds: _containers.RepeatedCompositeFieldContainer[RoundStatus]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    uptime_s: float
    lost_stages: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, run_id: _Optional[str] = ..., protocol_version: _Optional[int] = ..., members: _Optional[_Iterable[_Union[MemberStatus, _Mapping]]] = ..., rounds: _Optional[_Iterable[_Union[RoundStatus, _Mapping]]] = ..., events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., uptime_s: _Optional[float] = ..., lost_stages: _Optional[_Iterable[int]] = ...) -> None: ...
