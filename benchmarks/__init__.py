"""Repeatable measurements that print JSON; each is paired with the raw eventsourcing
library measured on the same database in the same run."""
