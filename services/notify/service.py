"""The notify nameko service: entrypoints only.

Today it starts, owns its tables and answers health; recipients, channels and delivery are the
notify issue's work (see README, "Status of the services").
"""

from services.common.base import ServiceBase
from services.common.outbox import OutboxRelay
from services.notify.models import outbox


class NotifyService(ServiceBase):
    name = "notify"

    relay = OutboxRelay(outbox)
