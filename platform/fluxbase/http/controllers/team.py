"""Team & Invitations: the reference doc's /api/team endpoints, plus PATCH /api/team and GET /api/invites.

Every project-scoped team endpoint, the listing included, needs `Need.MANAGE` (an admin
member's dashboard session or an admin-scope API key), because the doc says "All team
endpoints require admin-level privileges" (and the listing shows members' emails). Answering
an invitation and listing one's own invitations need the invited user's dashboard session.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from litestar import delete, get, patch, post
from litestar.params import QueryParameter

from fluxbase.http.context import AppContext
from fluxbase.http.edge import Caller
from fluxbase.http.shapes import Body
from fluxbase.services import team
from fluxbase.services.access import Need, authorize

ProjectQ = Annotated[str | None, QueryParameter(name="projectId", required=False)]
UserQ = Annotated[str | None, QueryParameter(name="userId", required=False)]
Role = Literal["admin", "developer", "viewer"]


class InviteBody(Body):
    project_id: str
    email: str
    role: Role


class AnswerInviteBody(Body):
    invite_id: str
    status: Literal["accepted", "rejected"]


class ChangeRoleBody(Body):
    project_id: str
    user_id: str
    role: Role


def member_out(m: team.Member) -> dict[str, Any]:
    return {
        "userId": m.user_id,
        "email": m.email,
        "displayName": m.display_name,
        "role": m.role,
        "joinedAt": m.joined_at,
    }


def invite_out(i: team.Invitation) -> dict[str, Any]:
    return {
        "id": i.id,
        "projectId": i.project_id,
        "email": i.email,
        "role": i.role,
        "status": i.status,
        "invitedAt": i.invited_at,
        "expiresAt": i.expires_at,
        "respondedAt": i.responded_at,
    }


@get("/api/team", operation_id="listTeam", tags=["team"])
async def list_team(ctx: AppContext, caller: Caller, project_id: ProjectQ = None) -> dict[str, Any]:
    access = await authorize(ctx.db, caller.principal, caller.key_project, project_id, Need.MANAGE)
    found = await team.list_team(ctx.db, access.project.id)
    return {
        "success": True,
        "members": [member_out(m) for m in found.members],
        "invites": [invite_out(i) for i in found.invites],
    }


@post("/api/team", operation_id="inviteMember", tags=["team"], status_code=201)
async def invite_member(data: InviteBody, ctx: AppContext, caller: Caller) -> dict[str, Any]:
    access = await authorize(ctx.db, caller.principal, caller.key_project, data.project_id, Need.MANAGE)
    invitation = await team.invite(ctx.db, ctx.settings, access, data.email, data.role)
    return {"success": True, "invite": invite_out(invitation)}


@post("/api/team/invites/accept", operation_id="answerInvite", tags=["team"], status_code=200)
async def answer_invite(data: AnswerInviteBody, ctx: AppContext, caller: Caller) -> dict[str, Any]:
    invitation = await team.respond(ctx.db, team.session_user(caller.principal), data.invite_id, data.status)
    return {"success": True, "invite": invite_out(invitation)}


@delete("/api/team", operation_id="removeMember", tags=["team"], status_code=200)
async def remove_member(
    ctx: AppContext, caller: Caller, project_id: ProjectQ = None, user_id: UserQ = None
) -> dict[str, Any]:
    access = await authorize(ctx.db, caller.principal, caller.key_project, project_id, Need.MANAGE)
    member = await team.remove_member(ctx.db, access, user_id)
    return {"success": True, "projectId": access.project.id, "userId": member.user_id}


@patch("/api/team", operation_id="changeMemberRole", tags=["team"])
async def change_member_role(data: ChangeRoleBody, ctx: AppContext, caller: Caller) -> dict[str, Any]:
    access = await authorize(ctx.db, caller.principal, caller.key_project, data.project_id, Need.MANAGE)
    member = await team.change_role(ctx.db, access, data.user_id, data.role)
    return {"success": True, "member": member_out(member)}


@get("/api/invites", operation_id="listMyInvites", tags=["team"])
async def list_my_invites(ctx: AppContext, caller: Caller) -> dict[str, Any]:
    found = await team.my_invites(ctx.db, team.session_user(caller.principal))
    return {
        "success": True,
        "invites": [{**invite_out(o.invitation), "projectName": o.project_name} for o in found],
    }
