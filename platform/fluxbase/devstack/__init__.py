"""Embedded PostgreSQL and S3 servers for `fluxbase dev` and the test suite (never production)."""
