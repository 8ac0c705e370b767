"""Fluxbase: a self-hostable backend-as-a-service on PostgreSQL."""

__version__ = "0.1.0"
