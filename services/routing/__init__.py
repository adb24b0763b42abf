"""Routing: triage each received case to the responsible department with a working-day deadline."""
