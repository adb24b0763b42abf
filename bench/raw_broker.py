"""The raw broker limit on this machine: kombu publishing persistent messages of a ticket's size
to a durable queue (with publisher confirms, as a ticketing system should) while another
connection consumes and acks them. What the pipeline is compared against.

    .venv/bin/python -m bench.raw_broker [--messages 20000] [--amqp-uri URI]
"""

import argparse
import json
import threading
import time
import uuid

from kombu import Connection, Exchange, Producer, Queue

TICKET = {
    "source": "hotline-12345",
    "external_id": "GD-000000",
    "title": "平湖街道海吉星市场货车早高峰占道",
    "description": "白坭坑社区海吉星市场货车早高峰排队占用人行道，学生上学人车混行，联系电话139****0000",
    "street": "平湖",
    "reporter_phone": "13900000000",
}


def measure(amqp_uri: str, messages: int, confirm: bool = True) -> dict:
    name = f"bench-raw-{uuid.uuid4().hex[:8]}"
    exchange = Exchange(name, "direct", durable=True)
    queue = Queue(name, exchange=exchange, routing_key=name, durable=True)
    body = json.dumps(TICKET, ensure_ascii=False)
    consumed, done = [0], threading.Event()

    with Connection(amqp_uri) as setup:
        queue(setup.channel()).declare()

    def consume():
        with Connection(amqp_uri) as connection:

            def on_message(_body, message):
                message.ack()
                consumed[0] += 1
                if consumed[0] >= messages:
                    done.set()

            with connection.Consumer(queue, callbacks=[on_message], accept=["json"], prefetch_count=200):
                while not done.is_set():
                    try:
                        connection.drain_events(timeout=1)
                    except TimeoutError:
                        pass

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    time.sleep(0.5)
    started = time.perf_counter()
    with Connection(amqp_uri, transport_options={"confirm_publish": confirm}) as connection:
        producer = Producer(connection.channel(), exchange=exchange, routing_key=name)
        for i in range(messages):
            producer.publish(body, content_type="application/json", content_encoding="utf-8", delivery_mode=2)
    published = time.perf_counter() - started
    done.wait(600)
    elapsed = time.perf_counter() - started
    with Connection(amqp_uri) as teardown:
        queue(teardown.channel()).delete()
    return {
        "messages": messages,
        "confirms": confirm,
        "publish_per_s": round(messages / published),
        "end_to_end_per_s": round(messages / elapsed),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--amqp-uri", default="amqp://guest:guest@127.0.0.1:5672/")
    args = parser.parse_args()
    for confirm in (True, False):
        print(json.dumps(measure(args.amqp_uri, args.messages, confirm)))


if __name__ == "__main__":
    main()
