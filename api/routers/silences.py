"""/silences: mute alerts by matcher (detector, entity, CIDR) until an expiry.

Matching open alerts become `silenced` (notify skips those) and return to `open` when no
silence matches them any more.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, status

from api.auth import Scope
from api.deps import AlertsWriter, QueriesDep, require
from api.queries import as_utc
from api.schemas import SilenceIn, SilenceOut, SilencePatch

router = APIRouter(prefix="/silences", tags=["silences"], dependencies=[Depends(require(Scope.ALERTS_READ))])

# Longer mutes are forgotten mutes: a year is the most a silence may last.
MAX_SILENCE = timedelta(days=366)


def _expiry(expires_at: datetime, now: datetime) -> datetime:
    expires_at = as_utc(expires_at)
    if expires_at <= now:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "expires_at must be in the future")
    if expires_at - now > MAX_SILENCE:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "a silence may last at most 366 days")
    return expires_at


@router.get("", response_model=list[SilenceOut])
def list_silences(
    queries: QueriesDep,
    include_expired: Annotated[bool, Query(description="Also list silences that have ended.")] = False,
) -> list[SilenceOut]:
    return [SilenceOut(**s) for s in queries.list_silences(include_expired=include_expired)]


@router.post("", response_model=SilenceOut, status_code=status.HTTP_201_CREATED)
def create_silence(body: SilenceIn, queries: QueriesDep, principal: AlertsWriter) -> SilenceOut:
    now = datetime.now(timezone.utc)
    if body.expires_at is not None:
        expires_at = _expiry(body.expires_at, now)
    else:
        assert body.duration_minutes is not None  # the model insists on exactly one of the two
        expires_at = _expiry(now + timedelta(minutes=body.duration_minutes), now)
    silence = queries.create_silence(
        detector=body.detector or None,
        entity=body.entity or None,
        cidr=body.cidr,
        comment=body.comment,
        created_by=f"{principal.name} ({principal.key_id})",
        expires_at=expires_at,
        now=now,
    )
    queries.apply_silences(now)
    return SilenceOut(**silence)


@router.get("/{silence_id}", response_model=SilenceOut)
def get_silence(silence_id: str, queries: QueriesDep) -> SilenceOut:
    silence = queries.get_silence(silence_id)
    if silence is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no silence {silence_id!r}")
    return SilenceOut(**silence)


@router.patch("/{silence_id}", response_model=SilenceOut)
def update_silence(silence_id: str, body: SilencePatch, queries: QueriesDep, _: AlertsWriter) -> SilenceOut:
    """Change the comment or move the expiry (to the future; use DELETE to end it now)."""
    now = datetime.now(timezone.utc)
    if queries.get_silence(silence_id, now) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no silence {silence_id!r}")
    expires_at = _expiry(body.expires_at, now) if body.expires_at is not None else None
    silence = queries.update_silence(silence_id, comment=body.comment, expires_at=expires_at, now=now)
    assert silence is not None
    queries.apply_silences(now)
    return SilenceOut(**silence)


@router.delete("/{silence_id}", response_model=SilenceOut)
def expire_silence(silence_id: str, queries: QueriesDep, _: AlertsWriter) -> SilenceOut:
    """End a silence now. It stays listed with include_expired=true, so past mutes stay explainable."""
    now = datetime.now(timezone.utc)
    silence = queries.expire_silence(silence_id, now)
    if silence is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no silence {silence_id!r}")
    queries.apply_silences(now)
    return SilenceOut(**silence)
