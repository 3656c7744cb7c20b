"""Celery plumbing: the app, the beat schedule and thin tasks (reminders, deviations)."""
