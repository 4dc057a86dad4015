"""Pravāha's long-lived service: drives the engine from a Redis stream (coming with issue 4)."""
