"""The work the workers do: reminders and the deviation monitor."""
