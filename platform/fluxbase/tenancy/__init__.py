"""Tenant execution, in one package: everything that runs SQL on a project's own roles.

`pools` (per-role connection pools) and `provision` (the roles and schema), `session` (the one
acquire / clean / BEGIN / deadline / COMMIT / reset routine, with backend termination),
`statements` (what a tenant statement is, by PostgreSQL's own parser), `params` (request
parameters to placeholder types), `results` (rows encoded within the caps), `errors` (SQLSTATE
to API error, one table) and `wire` (the one-round-trip protocol code: the only module that
touches asyncpg's internals).
"""
