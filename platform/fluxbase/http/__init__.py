"""HTTP transport: Litestar app factory, error edge, caller resolution and thin controllers."""
