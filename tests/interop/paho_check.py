"""Interop check with Python paho-mqtt (2.x) against a Herald broker in open mode.

Usage: python3 paho_check.py HOST PORT
Exits 0 and prints "ok" when every check passes; raises with a message otherwise.
"""
import sys
import threading
import time

import paho.mqtt.client as mqtt

HOST, PORT = sys.argv[1], int(sys.argv[2])
WAIT = 10


class Client:
    def __init__(self, client_id, protocol=mqtt.MQTTv311, clean=True, will=None):
        self.messages = []
        self.cond = threading.Condition()
        self.connack = None
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=protocol, clean_session=clean)
        if will:
            self.c.will_set(*will)
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.connect(HOST, PORT, keepalive=30)
        self.c.loop_start()
        self.wait(lambda: self.connack is not None, "CONNACK")

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        with self.cond:
            self.connack = (reason_code, flags.session_present)
            self.cond.notify_all()

    def _on_message(self, client, userdata, msg):
        with self.cond:
            self.messages.append((msg.topic, msg.payload, msg.qos, msg.retain))
            self.cond.notify_all()

    def wait(self, predicate, what):
        with self.cond:
            if not self.cond.wait_for(predicate, timeout=WAIT):
                raise AssertionError(f"timed out waiting for {what}")

    def subscribe(self, topic, qos):
        info = self.c.subscribe(topic, qos)
        assert info[0] == mqtt.MQTT_ERR_SUCCESS
        time.sleep(0.2)

    def publish(self, topic, payload, qos, retain=False):
        info = self.c.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout=WAIT)
        assert info.is_published(), f"publish to {topic} not acknowledged"

    def stop(self, disconnect=True):
        if disconnect:
            self.c.disconnect()
        self.c.loop_stop()


def main():
    sub = Client("paho-sub")
    assert sub.connack[0] == 0, sub.connack
    sub.subscribe("paho/#", 2)
    pub = Client("paho-pub", protocol=mqtt.MQTTv31)
    for qos in (0, 1, 2):
        pub.publish(f"paho/q{qos}", f"m{qos}".encode(), qos)
    sub.wait(lambda: len(sub.messages) == 3, "three messages")
    got = sorted((t, p, q) for (t, p, q, _) in sub.messages)
    assert got == [("paho/q0", b"m0", 0), ("paho/q1", b"m1", 1), ("paho/q2", b"m2", 2)], got

    # Retained message reaches a late subscriber with the retain flag.
    pub.publish("paho/retained", b"kept", 1, retain=True)
    late = Client("paho-late")
    late.subscribe("paho/retained", 1)
    late.wait(lambda: len(late.messages) == 1, "retained message")
    assert late.messages[0] == ("paho/retained", b"kept", 1, True), late.messages
    pub.publish("paho/retained", b"", 1, retain=True)

    # A will is published when a client vanishes without DISCONNECT.
    doomed = Client("paho-doomed", will=("paho/will", b"gone", 1, False))
    doomed.c.socket().close()
    doomed.stop(disconnect=False)
    sub.wait(lambda: any(t == "paho/will" for (t, _, _, _) in sub.messages), "will message")

    # A persistent session keeps QoS 1 messages while offline.
    keeper = Client("paho-keeper", clean=False)
    keeper.subscribe("paho/offline", 1)
    keeper.stop()
    pub.publish("paho/offline", b"while away", 1)
    keeper = Client("paho-keeper", clean=False)
    assert keeper.connack[1], "session present"
    keeper.wait(lambda: len(keeper.messages) == 1, "queued message")
    assert keeper.messages[0][1] == b"while away"
    for c in (sub, pub, late, keeper):
        c.stop()
    print("ok")


if __name__ == "__main__":
    main()
