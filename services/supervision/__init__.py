"""Supervision: its own projection of every case from the bus, and (with the supervision issue)
the rules that escalate unresolved cases."""
