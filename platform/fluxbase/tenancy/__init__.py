"""Tenant execution: what a tenant statement is and what it may do (see `statements`)."""
