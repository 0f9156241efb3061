"""The idempotency-claim vocabulary (spec §4), one for the mollifier service and its callers:
a key to claim and the answer for it.

Outcomes: CLAIMED (this caller owns the claim: write the run, then publish it, or release on
failure), EXISTING_RUN (the key resolves to that run: use it, write nothing), SKIPPED (the
organization has no mollifier flag: no claim; the run store's unique key dedups), PENDING
(another caller still holds the claim after the wait). A claim held by the key's own non-empty
`owner` is not another caller's: it answers CLAIMED with the token held.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from runops.common.v1 import common_pb2
from runops.mollifier.v1 import mollifier_pb2 as m


class ClaimOutcome(enum.Enum):
    CLAIMED = m.CLAIM_OUTCOME_CLAIMED
    EXISTING_RUN = m.CLAIM_OUTCOME_EXISTING_RUN
    SKIPPED = m.CLAIM_OUTCOME_SKIPPED
    PENDING = m.CLAIM_OUTCOME_PENDING


@dataclass(frozen=True)
class KeyToClaim:
    task_identifier: str
    idempotency_key: str
    # The key's own expiry (clamps the claim's TTL to [5 s, 30 s]); None: no expiry.
    expires_at: datetime | None = None
    # The caller's logical attempt (a batch's id): a key this owner claimed and has not
    # published yet answers CLAIMED again with the token held, not PENDING. "": no owner.
    owner: str = ""


@dataclass(frozen=True)
class ClaimAnswer:
    """One key's answer, in the order asked."""

    key: KeyToClaim
    outcome: ClaimOutcome
    # CLAIMED: the ownership token that publishes or releases the claim.
    claim_token: str = ""
    # EXISTING_RUN: the id of the run the key resolves to.
    existing_run_id: str = ""
    # EXISTING_RUN of a single claim in the service: that run, persisted or buffered.
    existing_run: common_pb2.Run | None = None
