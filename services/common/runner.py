"""Run one service in this process: ``python -m services.common.runner intake``.

eventlet must patch the standard library before anything else is imported, and psycopg2 must be
made cooperative, or one slow query would stall every greenthread of the service.
"""

import eventlet

eventlet.monkey_patch()

import sys  # noqa: E402

from psycogreen.eventlet import patch_psycopg  # noqa: E402

patch_psycopg()

import gc  # noqa: E402
import importlib  # noqa: E402
import logging.config  # noqa: E402

from nameko.runners import ServiceRunner  # noqa: E402

from services.common import config as settings  # noqa: E402

SERVICE_CLASSES = {
    "intake": "services.intake.service:IntakeService",
    "routing": "services.routing.service:RoutingService",
    "supervision": "services.supervision.service:SupervisionService",
    "notify": "services.notify.service:NotifyService",
}


def load_service_class(name: str):
    module_name, class_name = SERVICE_CLASSES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def freeze_what_start_made() -> None:
    """Leave the objects made at start out of every later garbage collection (gc.freeze).

    Python's full collection walks every object the process holds, and nearly all of them were
    made at start and live until exit: modules, SQLAlchemy's tables, nameko's extensions, the
    rules. Walked, they made each full collection a pause of every greenthread of the service:
    170-315 ms in supervision, 229-287 ms in intake and notify (bench/e2e.py at 200 cases/s,
    2 Dec; full collections come every 10-30 s while a young process's heap grows); 5-60 ms
    frozen. (Frozen objects that later become cyclic garbage are never freed: ``main`` collects
    what loading left before the service starts, and start itself makes little garbage.)"""
    gc.freeze()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in SERVICE_CLASSES:
        print(f"usage: python -m services.common.runner {{{','.join(SERVICE_CLASSES)}}}", file=sys.stderr)
        return 2
    name = argv[0]
    config = settings.nameko_config(name)
    logging.config.dictConfig(config["LOGGING"])
    runner = ServiceRunner(config)
    runner.add_service(load_service_class(name))

    import signal

    def stop(signum, frame):
        eventlet.spawn_n(runner.stop)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # What loading made and dropped, collected before any message can wait on the pause: after
    # start, this collection held each service for 106-185 ms (2 Dec).
    gc.collect()
    runner.start()
    freeze_what_start_made()
    logging.getLogger("huiying").info("%s started, http on %s", name, config["WEB_SERVER_ADDRESS"])
    runner.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
