"""Log records the services shape before they are written (wired in config.logging_config)."""

import logging

# nameko.containers' line for an entrypoint's expected exception (nameko 2.14)
EXPECTED = "(expected) error handling worker"


class ExpectedErrorsBriefly(logging.Filter):
    """nameko logs an exception an entrypoint expects as a WARNING, with its traceback. That covers an
    API's 401, 404 or 422 (every ``ApiError``) and a CLI's bad input over RPC: a caller's
    mistake, answered as designed, written as if the server had failed. Writing it took about a
    fifth of the CPU that ``GET /api/v1/cases/<an unknown id>`` cost intake, most of it for the
    traceback (py-spy's share of 1.37 ms a request, 6 Dec). Such a record becomes one INFO line
    with the exception's message, and shows only where INFO does. A record of an unexpected
    exception keeps its level and traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not (isinstance(record.msg, str) and record.msg.startswith(EXPECTED) and record.exc_info):
            return True
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        return logging.getLogger().isEnabledFor(logging.INFO)
