"""Adapters: event store wiring, tables, the command bus, audit, CLI and settings."""
