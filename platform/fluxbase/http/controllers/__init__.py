"""Thin route handlers: decode a Struct, call one service, return the documented shape."""
