"""Who a storage request acts for: a trusted caller, or an end user under the bucket's rules.

Every storage file endpoint (list, sign, upload, presigned POST, confirm, delete) starts here.
A request that carries an end-user token (`X-Fluxbase-User-Token`) acts as that user: the key's
scope must allow the operation and then each bucket's end-user rules decide (storage/rules.py,
docs/storage-access.md). A `requireUserAuth` key without a token is refused by the one shared
rule (`IdentityResolver.identity`). A request without a token is a trusted server's (API key)
or a dashboard member's, governed by scope or role alone.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import asyncpg

from fluxbase.services.access import Need, Principal, Project, ProjectAccess, authorize
from fluxbase.services.identity import IdentityResolver


class Op(enum.Enum):
    """A storage file operation, with the need of a trusted caller and of an end user."""

    READ = (Need.READ, Need.READ)  # list buckets or files, sign downloads
    WRITE = (Need.WRITE, Need.WRITE)  # upload, presigned POST, confirm
    # Deleting needs admin scope (developer role) from trusted callers; for an end user the
    # bucket's delete rule is the owner's explicit grant, so a readwrite key suffices.
    DELETE = (Need.SCHEMA, Need.WRITE)


@dataclass(frozen=True)
class StorageAccess:
    """The authorised project and caller; `end_user` is the uid whose rules apply, if any."""

    access: ProjectAccess
    end_user: str | None = None

    @property
    def project_id(self) -> str:
        return self.access.project.id


async def storage_access(
    db: asyncpg.Pool,
    identity: IdentityResolver,
    principal: Principal,
    key_project: Project | None,
    project_id: str | None,
    op: Op,
    user_token: str | None,
) -> StorageAccess:
    """Authorise a storage file operation and resolve the end user it runs for."""
    trusted_need, end_user_need = op.value
    key = principal.key
    # A requireUserAuth key is always an end user's (without a token, identity() refuses it).
    as_end_user = bool(user_token) or (key is not None and key.require_user_auth)
    need = end_user_need if as_end_user else trusted_need
    access = await authorize(db, principal, key_project, project_id, need, end_user_surface=True)
    who = await identity.identity(access, user_token=user_token, auth_uid=None)
    if not user_token:
        return StorageAccess(access)
    assert who.uid is not None
    return StorageAccess(access, who.uid)
