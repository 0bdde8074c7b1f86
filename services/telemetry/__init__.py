"""Every SQL statement of telemetry ingestion: one group of requests written in one transaction.

A group is the merge of many concurrent `POST /telemetry` requests (services/ingest.py).
`write_group` (write.py) runs these steps over one `Group` (group.py), set-based and in a
fixed lock order (telemetry rows, then vehicles, then rollout targets, each sorted by
vehicle id); docs/telemetry.md says why each is shaped as it is:

- refuse.py: a group with a scoped caller (or one whose optimistic pass met an unknown
  vehicle) first refuses, whole, each request naming a vehicle unknown or out of scope.
- group.py `merge`: the live requests as one batch (events deduplicated, the newest
  heartbeat and the greatest-`(epoch, seq)` event per vehicle), by the rules of clock.py:
  lastSeenAt is each request's arrival, a heartbeat's values are ordered by its `sentAt`
  capped at that arrival.
- staging.py `stage`: binary COPY into session-local staging tables, and one row per vehicle
  touched built from them in SQL.
- heartbeats.py `upsert_narrow_rows`: the narrow `vehicle_telemetry` row of every vehicle
  with a heartbeat (a HOT update); flags the vehicles whose status a heartbeat may change.
- lock.py `lock_wide_rows`: locks (`FOR NO KEY UPDATE`, in id order) and reads the wide
  `vehicles` rows of the vehicles with events and the flagged ones (`LockedRow`), staging
  the rows whose status is to be derived; a new latest event whose `seq` jumps too far
  (clock.py) redoes the group without its request (`SeqJumped`, write.py).
- events.py `insert_events`: the events into `timeline_events` (a plain insert in a
  savepoint when all are newer than what is stored, else `ON CONFLICT DO NOTHING`), and each
  request's accepted and duplicate counts.
- heartbeats.py `refresh_wide_rows`: heartbeats that change something visible but not the
  status reach the wide row of the vehicles not locked, in one `UPDATE`.
- derive.py `derive_statuses`, `write_derived_rows`: the pure `derive_status` for each
  locked row with a new latest event (or flagged), written back by the row's address, the
  status changes into the change feed.
- outcomes.py `pick_outcomes`, `record_outcomes`: rollout outcomes, when the new latest
  event is about the desired state the vehicle's rollout issued.

recompute.py `recompute_statuses` derives statuses from scratch: the consistency check.
"""

from services.telemetry.group import GroupRequest, GroupResult, WideWritePolicy
from services.telemetry.recompute import recompute_statuses
from services.telemetry.write import write_group

__all__ = [
    "GroupRequest",
    "GroupResult",
    "WideWritePolicy",
    "recompute_statuses",
    "write_group",
]
