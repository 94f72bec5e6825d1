"""Python paho-mqtt over WebSocket and over TLS against Herald.

Usage: python3 paho_transports.py WS_PORT TLS_PORT CA_FILE USERNAME PASSWORD_FOR_WS PASSWORD_FOR_TLS
Prints "ok" when a message goes WebSocket -> TLS and TLS -> WebSocket.
"""
import ssl
import sys
import threading

import paho.mqtt.client as mqtt

WS_PORT, TLS_PORT, CA, USER, WS_PW, TLS_PW = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]


def client(client_id, password, transport, port, tls):
    got = []
    cond = threading.Condition()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, transport=transport)
    c.username_pw_set(USER, password)
    if transport == "websockets":
        c.ws_set_options(path="/mqtt")
    if tls:
        c.tls_set(ca_certs=CA, cert_reqs=ssl.CERT_REQUIRED)

    def on_message(cl, u, msg):
        with cond:
            got.append(msg.payload)
            cond.notify_all()

    connected = threading.Event()
    c.on_connect = lambda cl, u, f, rc, p: connected.set() if rc == 0 else None
    c.on_message = on_message
    c.connect("127.0.0.1", int(port), keepalive=30)
    c.loop_start()
    if not connected.wait(10):
        raise AssertionError(f"{client_id}: no CONNACK over {transport}")
    return c, got, cond


ws, ws_got, ws_cond = client("GID_demo@@@py-ws", WS_PW, "websockets", WS_PORT, False)
tls, tls_got, tls_cond = client("GID_demo@@@py-tls", TLS_PW, "tcp", TLS_PORT, True)
ws.subscribe("demo/py/to-ws", 1)
tls.subscribe("demo/py/to-tls", 1)
import time
time.sleep(0.3)
ws.publish("demo/py/to-tls", b"from-ws", qos=1).wait_for_publish(10)
tls.publish("demo/py/to-ws", b"from-tls", qos=1).wait_for_publish(10)
with tls_cond:
    assert tls_cond.wait_for(lambda: tls_got == [b"from-ws"], 10), tls_got
with ws_cond:
    assert ws_cond.wait_for(lambda: ws_got == [b"from-tls"], 10), ws_got
for c in (ws, tls):
    c.disconnect()
    c.loop_stop()
print("ok")
