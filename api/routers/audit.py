"""/audit: the request audit log (who called what, when, with what answer), for admins."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from api.auth import Scope
from api.deps import QueriesDep, require
from api.schemas import AuditOut

router = APIRouter(prefix="/audit", tags=["audit"], dependencies=[Depends(require(Scope.ADMIN))])


@router.get("", response_model=list[AuditOut])
def audit(
    queries: QueriesDep,
    since: datetime | None = None,
    key_id: str | None = None,
    client_ip: str | None = None,
    outcome: Annotated[
        str | None, Query(description="ok, missing_key, bad_key, revoked_key, rate_limited, forbidden, …")
    ] = None,
    # Bounded to BIGINT: a larger number is a 422, not an overflow inside the database driver.
    before_id: Annotated[
        int | None, Query(ge=1, le=2**63 - 1, description="Page backwards: audit_id of the last row seen.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AuditOut]:
    """Newest first."""
    rows = queries.list_audit(
        limit=limit, before_id=before_id, key_id=key_id, client_ip=client_ip, outcome=outcome, since=since
    )
    return [AuditOut(**r) for r in rows]
