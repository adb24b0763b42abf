"""PostgreSQL's autovacuum, stood in for by the benchmarks when the server runs without it."""

import threading

import psycopg2


class Autovacuum:
    """Stands in for PostgreSQL's autovacuum when the server runs without it (this machine's
    PostgreSQL has ``autovacuum = off``): a deployment's tables are vacuumed and analyzed as
    they change, and without that the planner never learns how large the benchmark's fresh
    tables have grown (intake's duplicate check scanned every case of its source: 5 ms instead
    of an index lookup; a sweep's first pass checked each new agenda link's foreign key by
    scanning every agenda item, with the plan made while the table was empty) and updated rows
    bloat the heap. Every 15 s (the benchmark's database lives minutes, not the months a
    deployment's does: its tables are young, not unvisited) it applies autovacuum's default
    thresholds to each table of the benchmark's database — VACUUM when dead rows exceed 50 + 20 %
    of the live ones, ANALYZE when rows changed since the last analyze exceed 50 + 10 % — as the
    server's own launcher would, with its cost-based delay. Its work counts in PostgreSQL's CPU,
    as autovacuum's would."""

    NAPTIME_SECONDS = 15

    def __init__(self, database_url: str):
        self.connection = psycopg2.connect(database_url)
        self.connection.autocommit = True  # VACUUM cannot run in a transaction
        cursor = self.connection.cursor()
        cursor.execute("SHOW autovacuum")
        self.needed = cursor.fetchone()[0] == "off"
        # Autovacuum's workers pause as they go (cost-based delay: 2 ms per 200 page costs by
        # default) so as not to starve the queries beside them; a plain VACUUM does not pause.
        # The stand-in takes the server's autovacuum settings, so that its bursts weigh on the
        # services as autovacuum's would (unthrottled, they took a core for a moment).
        cursor.execute(
            "SELECT current_setting('autovacuum_vacuum_cost_delay'),"
            " current_setting('autovacuum_vacuum_cost_limit')::int"
        )
        delay, limit = cursor.fetchone()
        cursor.execute("SELECT set_config('vacuum_cost_delay', %s, false)", (delay,))
        if limit > 0:  # -1: autovacuum uses vacuum_cost_limit, as this session then does
            cursor.execute("SELECT set_config('vacuum_cost_limit', %s, false)", (str(limit),))
        self.done = threading.Event()
        self.tables_done = 0  # VACUUMs and ANALYZEs run
        self.thread = threading.Thread(target=self.run, daemon=True)
        if self.needed:
            self.thread.start()

    def run(self):
        cursor = self.connection.cursor()
        while not self.done.wait(self.NAPTIME_SECONDS):
            cursor.execute(
                "SELECT relname, n_dead_tup > 50 + 0.2 * n_live_tup, n_mod_since_analyze > 50 + 0.1 * n_live_tup"
                " FROM pg_stat_user_tables"
            )
            for table, vacuum, analyze in cursor.fetchall():
                command = {(True, True): "VACUUM (ANALYZE)", (True, False): "VACUUM", (False, True): "ANALYZE"}.get(
                    (vacuum, analyze)
                )
                if command:
                    cursor.execute(f'{command} "{table}"')
                    self.tables_done += 1

    def stop(self) -> dict:
        self.done.set()
        if self.needed:
            self.thread.join()
        self.connection.close()
        return {"stood_in_for_autovacuum": self.needed, "tables_vacuumed_or_analyzed": self.tables_done}
