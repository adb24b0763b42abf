"""The ``huiying`` operator CLI (see README and shared/CONTRACT.md)."""
