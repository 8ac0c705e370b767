"""Outgoing email: templates, the PostgreSQL outbox, single-use link tokens, the SMTP sender and a
local mail catcher for development."""
