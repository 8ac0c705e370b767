-- Team invitations: an admin invites a registered account (by email) into a project with a
-- role; the invited user accepts or rejects. One row per (project, email), compared without
-- case: inviting the same address again resets that row to a fresh pending invitation.
-- Membership itself lives in fluxbase.project_members (0001); this table is only the offer.

CREATE TABLE IF NOT EXISTS fluxbase.invitations (
    id           text PRIMARY KEY CHECK (id ~ '^inv_[0-9a-f]{16}$'),
    project_id   text NOT NULL REFERENCES fluxbase.projects (id) ON DELETE CASCADE,
    email        text NOT NULL,
    role         text NOT NULL CHECK (role IN ('admin', 'developer', 'viewer')),
    -- 'expired' is written when an expired invitation is answered; a pending row past
    -- expires_at is expired whether or not that has happened yet.
    status       text NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'accepted', 'rejected', 'expired')),
    -- Who sent it, as 'user:<id>' or 'key:<id>' (API keys may invite, too).
    invited_by   text NOT NULL,
    invited_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    responded_at timestamptz
);

CREATE UNIQUE INDEX IF NOT EXISTS invitations_project_email_key
    ON fluxbase.invitations (project_id, lower(email));

-- GET /api/invites: a user's open invitations across projects.
CREATE INDEX IF NOT EXISTS invitations_pending_email_idx
    ON fluxbase.invitations (lower(email)) WHERE status = 'pending';
