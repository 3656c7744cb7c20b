"""The write side's plumbing: the event store's wiring and settings, the command bus, the
command data schemas and correction rules, our own tables and their migrations, tokens."""
