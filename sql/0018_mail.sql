-- Email (platform/fluxbase/mail/): an outbox of messages written in the same transaction as the
-- action that causes them and sent by `fluxbase worker`; single-use tokens behind every link;
-- per-project template overrides; end-user email verification and a redirect allow-list.

-- One row per message. Bodies are kept only until the message is finished (sent, bounced or
-- failed): they carry single-use tokens, and the log needs none of them.
CREATE TABLE IF NOT EXISTS fluxbase.mail_outbox (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    project_id      text REFERENCES fluxbase.projects (id) ON DELETE CASCADE,  -- NULL: the instance's own
    kind            text NOT NULL,
    recipient       text NOT NULL,
    subject         text NOT NULL,
    text_body       text NOT NULL,
    html_body       text NOT NULL,
    status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'failed', 'bounced')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    locked_until    timestamptz,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz
);
CREATE INDEX IF NOT EXISTS mail_outbox_due_idx ON fluxbase.mail_outbox (next_attempt_at) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS mail_outbox_project_idx ON fluxbase.mail_outbox (project_id, id DESC);

-- Tokens behind emailed links: random, stored as SHA-256, single-use (consumed by
-- UPDATE ... WHERE used_at IS NULL RETURNING), expiring. Exactly one of project_user_id (an
-- end user of project_id) and account_id (a dashboard account) is set. `email` is the address
-- the message went to (for an email change, the new address).
CREATE TABLE IF NOT EXISTS fluxbase.mail_tokens (
    token_hash      bytea PRIMARY KEY,
    purpose         text NOT NULL CHECK (purpose IN ('verify', 'reset', 'magic_link', 'email_change', 'account_reset')),
    project_id      text REFERENCES fluxbase.projects (id) ON DELETE CASCADE,
    project_user_id text REFERENCES fluxbase.project_users (id) ON DELETE CASCADE,
    account_id      text REFERENCES fluxbase.users (id) ON DELETE CASCADE,
    email           text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL,
    used_at         timestamptz,
    CHECK ((project_user_id IS NULL) <> (account_id IS NULL)),
    CHECK ((project_user_id IS NULL) = (project_id IS NULL))
);
CREATE INDEX IF NOT EXISTS mail_tokens_user_idx ON fluxbase.mail_tokens (project_user_id);
CREATE INDEX IF NOT EXISTS mail_tokens_account_idx ON fluxbase.mail_tokens (account_id);
CREATE INDEX IF NOT EXISTS mail_tokens_expires_idx ON fluxbase.mail_tokens (expires_at);

-- A project's own wording for a kind of message (validated by mail/templates.py).
CREATE TABLE IF NOT EXISTS fluxbase.project_mail_templates (
    project_id text NOT NULL REFERENCES fluxbase.projects (id) ON DELETE CASCADE,
    kind       text NOT NULL,
    subject    text NOT NULL,
    text_body  text NOT NULL,
    html_body  text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, kind)
);

ALTER TABLE fluxbase.project_users ADD COLUMN IF NOT EXISTS email_verified_at timestamptz;
ALTER TABLE fluxbase.project_auth_settings
    ADD COLUMN IF NOT EXISTS email_verification text NOT NULL DEFAULT 'off';
ALTER TABLE fluxbase.project_auth_settings ADD COLUMN IF NOT EXISTS redirect_urls text[] NOT NULL DEFAULT '{}';
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'project_auth_settings_email_verification_check') THEN
        ALTER TABLE fluxbase.project_auth_settings ADD CONSTRAINT project_auth_settings_email_verification_check
            CHECK (email_verification IN ('off', 'optional', 'required'));
    END IF;
END
$$;
