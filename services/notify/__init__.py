"""Notify: tells departments, supervisors, members and citizens of each step (the notify issue)."""
