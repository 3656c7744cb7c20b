"""Followers of the notification log, the read models they build, their quarantine, and the
queries answered from them."""
