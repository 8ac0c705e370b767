"""Team & Invitations: the reference doc's /api/team endpoints, plus PATCH /api/team and GET /api/invites.

Every project-scoped team endpoint, the listing included, needs `Need.MANAGE` (an admin
member's dashboard session or an admin-scope API key), because the doc says "All team
endpoints require admin-level privileges" (and the listing shows members' emails). Answering
an invitation and listing one's own invitations need the invited user's dashboard session.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from litestar import delete, get, patch, post
from litestar.params import QueryParameter

from fluxbase.http.context import AppContext
from fluxbase.http.edge import Caller
from fluxbase.http.shapes import Answer, Body, Out
from fluxbase.services import team
from fluxbase.services.access import Need

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


class MemberOut(Out):
    user_id: str
    email: str
    display_name: str
    role: str
    joined_at: datetime


class InviteOut(Out):
    id: str
    project_id: str
    email: str
    role: str
    status: str
    invited_at: datetime
    expires_at: datetime
    responded_at: datetime | None


class MyInviteOut(InviteOut):
    project_name: str


class TeamAnswer(Answer, kw_only=True):
    members: list[MemberOut]
    invites: list[InviteOut]


class InviteAnswer(Answer, kw_only=True):
    invite: InviteOut


class MemberRemoved(Answer, kw_only=True):
    project_id: str
    user_id: str


class MemberAnswer(Answer, kw_only=True):
    member: MemberOut


class MyInvitesAnswer(Answer, kw_only=True):
    invites: list[MyInviteOut]


def member_out(m: team.Member) -> MemberOut:
    return MemberOut(m.user_id, m.email, m.display_name, m.role, m.joined_at)


def invite_out(i: team.Invitation) -> InviteOut:
    return InviteOut(
        i.id, i.project_id, i.email, i.role, i.status, i.invited_at, i.expires_at, i.responded_at
    )


def _my_invite(o: team.OpenInvitation) -> MyInviteOut:
    i = o.invitation
    return MyInviteOut(
        i.id,
        i.project_id,
        i.email,
        i.role,
        i.status,
        i.invited_at,
        i.expires_at,
        i.responded_at,
        o.project_name,
    )


@get("/api/team", operation_id="listTeam", tags=["team"])
async def list_team(ctx: AppContext, caller: Caller, project_id: ProjectQ = None) -> TeamAnswer:
    access = await caller.access(ctx, project_id, Need.MANAGE)
    found = await team.list_team(ctx.db, access.project.id)
    return TeamAnswer(
        members=[member_out(m) for m in found.members], invites=[invite_out(i) for i in found.invites]
    )


@post("/api/team", operation_id="inviteMember", tags=["team"], status_code=201)
async def invite_member(data: InviteBody, ctx: AppContext, caller: Caller) -> InviteAnswer:
    access = await caller.access(ctx, data.project_id, Need.MANAGE)
    invitation = await team.invite(ctx.db, ctx.settings, access, data.email, data.role)
    return InviteAnswer(invite=invite_out(invitation))


@post("/api/team/invites/accept", operation_id="answerInvite", tags=["team"], status_code=200)
async def answer_invite(data: AnswerInviteBody, ctx: AppContext, caller: Caller) -> InviteAnswer:
    invitation = await team.respond(ctx.db, team.session_user(caller.principal), data.invite_id, data.status)
    return InviteAnswer(invite=invite_out(invitation))


@delete("/api/team", operation_id="removeMember", tags=["team"], status_code=200)
async def remove_member(
    ctx: AppContext, caller: Caller, project_id: ProjectQ = None, user_id: UserQ = None
) -> MemberRemoved:
    access = await caller.access(ctx, project_id, Need.MANAGE)
    member = await team.remove_member(ctx.db, access, user_id)
    return MemberRemoved(project_id=access.project.id, user_id=member.user_id)


@patch("/api/team", operation_id="changeMemberRole", tags=["team"])
async def change_member_role(data: ChangeRoleBody, ctx: AppContext, caller: Caller) -> MemberAnswer:
    access = await caller.access(ctx, data.project_id, Need.MANAGE)
    member = await team.change_role(ctx.db, access, data.user_id, data.role)
    return MemberAnswer(member=member_out(member))


@get("/api/invites", operation_id="listMyInvites", tags=["team"])
async def list_my_invites(ctx: AppContext, caller: Caller) -> MyInvitesAnswer:
    found = await team.my_invites(ctx.db, team.session_user(caller.principal))
    return MyInvitesAnswer(invites=[_my_invite(o) for o in found])
