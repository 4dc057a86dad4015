"""Pravāha's client SDK and bulk-job tools (coming with issues 4 and 5)."""
