-- Sign-ups with an address that already has an account (services/end_users.py). With
-- emailVerification = 'required' such a sign-up is answered like a new one, so that the answer
-- does not tell whether the address has an account; and a login with the password that sign-up
-- chose must then answer as for a new, unverified account (403 EMAIL_NOT_VERIFIED), not as a
-- wrong password. The chosen password's hash is kept here for that answer only — it never
-- becomes the account's password (the owner gets a password-reset link instead: applying it
-- would hand the account to whoever signed up last).
CREATE TABLE IF NOT EXISTS fluxbase.project_user_signup_attempts (
    user_id       text NOT NULL REFERENCES fluxbase.project_users (id) ON DELETE CASCADE,
    password_hash text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS project_user_signup_attempts_user_idx
    ON fluxbase.project_user_signup_attempts (user_id, created_at DESC);
