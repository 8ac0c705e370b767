"""The Fluxbase realtime service: WebSocket fan-out of committed database events."""
