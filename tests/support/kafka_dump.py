"""Consumes a Kafka topic from the beginning with confluent-kafka and prints
one JSON line per message: {"key", "headers", "value"}. Stops after EXPECTED
distinct idempotency keys or TIMEOUT seconds.

usage: kafka_dump.py BROKERS TOPIC EXPECTED TIMEOUT
"""
import json
import sys
import time
import uuid

from confluent_kafka import Consumer

brokers, topic, expected, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
c = Consumer({
    "bootstrap.servers": brokers,
    "group.id": "dump-" + uuid.uuid4().hex,
    "auto.offset.reset": "earliest",
    "enable.auto.commit": False,
})
c.subscribe([topic])
seen = set()
deadline = time.time() + timeout
while time.time() < deadline and len(seen) < expected:
    m = c.poll(0.5)
    if m is None or m.error():
        continue
    headers = {k: (v.decode() if v is not None else None) for k, v in (m.headers() or [])}
    seen.add(headers.get("idempotency-key"))
    print(json.dumps({
        "key": m.key().decode() if m.key() else None,
        "headers": headers,
        "value": json.loads(m.value()),
    }), flush=True)
c.close()
