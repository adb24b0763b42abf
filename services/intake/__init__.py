"""Intake: every channel (HTTP API, Open311, AMQP ticket queue, batch import) ends in one
validated, stored case and one ``case_received`` event."""
