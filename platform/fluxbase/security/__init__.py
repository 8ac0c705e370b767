"""Credentials: password hashing, session tokens, API key format, derived role passwords."""
