"""Signed, retried, logged webhooks fed by the event outbox (see delivery.py for the design)."""
