"""A rollout's queries and writes, one module per step of its life:

- `create`: the API's create and dry run (release, scope, safety, overlap checks), the row.
- `plan`: at the workflow's start, the targets expanded into stages (once).
- `issue`: a stage's desired state issued to its vehicles, batch by batch.
- `sweeps`: while a stage bakes, apply timeouts, retries and blocked re-checks.
- `outcomes`: what vehicles report (from telemetry) and the counts the gates judge.
- `rollback`: issued targets returned to their previous release; unissued ones skipped.
- `status`: the only writer of a rollout's status, with its audit entry and stream event.
- `control`: an operator's pause, resume, rollback or abort, audited.
- `queries`: the API's reads and the rows the activities read by id.
- `counters`: the progress counters, moved in the statements that move targets.

Vehicle lists never leave PostgreSQL: each function is a few set-based statements whatever
the fleet size. Functions take keyword-only arguments and an `AsyncSession`; they only flush,
the caller (an activity, or an API request) owns the transaction. The workflow path's writes
are idempotent: an activity that runs twice leaves the same rows as one that ran once.
"""
