"""What each service's database sessions were doing during a run, sampled from pg_stat_activity:
whether a case's way is held up by PostgreSQL (locks, WAL flushes, running statements) or by the
service between its statements ("idle in transaction": PostgreSQL waits for the client, which is
busy with Python or waiting for a core).

Every ``INTERVAL`` seconds a thread reads the sessions of the benchmark's database; the summary
gives, per application name (``huiying-intake``, …), the mean number of its sessions in each
state over the run: 0.6 under ``idle in transaction`` means that, on average, 0.6 of the
service's transactions were open and waiting for the service itself.
"""

import threading
from collections import Counter

import psycopg2

INTERVAL = 0.05

QUERY = """
SELECT coalesce(nullif(application_name, ''), 'other'),
       CASE
         WHEN state = 'active' AND wait_event_type IS NULL THEN 'running'
         WHEN state = 'active' THEN 'waiting: ' || wait_event_type || ' ' || wait_event
         ELSE state
       END
FROM pg_stat_activity
WHERE datname = %s AND pid <> pg_backend_pid() AND state IS NOT NULL AND state <> 'idle'
"""


class DatabaseWaits:
    def __init__(self, dsn: str, database: str):
        self.dsn, self.database = dsn, database
        self.tally: Counter = Counter()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = None

    def start(self):
        self.tally.clear()
        self.samples = 0
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="database-waits", daemon=True)
        self._thread.start()

    def _sample(self):
        connection = psycopg2.connect(self.dsn)
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                while not self._stop.wait(INTERVAL):
                    cursor.execute(QUERY, (self.database,))
                    self.tally.update(cursor.fetchall())
                    self.samples += 1
        finally:
            connection.close()

    def stop(self) -> dict:
        """``{application: {state: mean sessions in it}}``, states by that mean, largest first
        (only those above 0.005)."""
        self._stop.set()
        self._thread.join(timeout=10)
        if not self.samples:
            return {}
        summary: dict = {}
        for (application, state), count in sorted(self.tally.items(), key=lambda item: -item[1]):
            mean = round(count / self.samples, 3)
            if mean >= 0.005:
                summary.setdefault(application, {})[state] = mean
        return {"samples": self.samples, "mean_sessions": dict(sorted(summary.items()))}
