#!/usr/bin/env python3
"""Churn and crash check: Herald under connect/publish/disconnect/takeover churn, then under
SIGKILLs, over loopback, with the invariants a presence backend and a device fleet rely on.

    cargo build --release -p herald
    scripts/churn-check.py                       # about 45 s; exit status 1 on any violation

Phase 1, churn (CHURN_SECS, 12 s): IDS client ids (20), WORKERS connections fighting over each
(4), each connection one of: QoS 1 PUBLISHes waited for, then DISCONNECT or a dropped socket;
QoS 1 PUBLISHes and DISCONNECT in one write, then closed at once without reading; or held open
until a later connection with the same id takes it over; and every 50 ms the admin API kicks a
random client. A watcher reads every message and every presence notice (a `status_notice` rule
to an `mqtt` sink). Checked:
  - every CONNECT is answered (CONNACK, or a close when a newer CONNECT replaced it) within 3 s;
  - every PUBLISH the broker acknowledged is delivered;
  - every PUBLISH sent before a DISCONNECT is delivered when its channel ended `client_disconnect`;
  - every channel has exactly one `connect` and one `tcpclean`, in that order, with a
    `disconnect` between them only when the reason is `client_disconnect`; every CONNACK has
    its `connect`; no `eventId` twice; each client's `seq` increases;
  - a channel whose client sent DISCONNECT ends `client_disconnect` (or `taken_over`, `kicked`
    when that came first), and none ends as a slow consumer (only the watcher subscribes);
  - each client's retained `$presence` snapshot is its last event (seq, kind, reason, channel,
    address, time), checked while every client id is connected once more and after all left;
  - afterwards the broker reports 0 connections.
Phase 2, crash (CRASH_SECS, 16 s, a SIGKILL and restart every 4 s): IDS persistent sessions
subscribed at QoS 1, WORKERS connections per id coming and going (DISCONNECT, dropped socket,
reset, or leaving without acknowledging), a commander publishing QoS 1 commands to them.
Checked: the sessions survive every restart (session present), and every command the broker
acknowledged reaches its device (duplicates are allowed: QoS 1).

Plain MQTT 3.1.1 over asyncio streams; no client package needed. The broker runs from
target/release/herald (HERALD_BIN) with `storage.sync = "always"` in a temp directory.
"""
import asyncio
import base64
import collections
import hashlib
import hmac
import json
import logging
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts", "lib"))
from mqtt import (DISCONNECT, connect_packet, parse_publish, publish_packet,  # noqa: E402
                  read_packet, subscribe_packet)
BIN = os.environ.get("HERALD_BIN", os.path.join(ROOT, "target", "release", "herald"))
IDS = int(os.environ.get("IDS", 20))
WORKERS = int(os.environ.get("WORKERS", 4))
CHURN_SECS = float(os.environ.get("CHURN_SECS", 12))
CRASH_SECS = float(os.environ.get("CRASH_SECS", 16))
random.seed(int(os.environ.get("SEED", 1)))
HOST = "127.0.0.1"
ADMIN_SECRET = "churn-admin-secret"
# The check's own clients, whose events are not the churn's.
OBSERVERS = ("churn-watcher", "churn-snapshots")


def reset_on_close(writer):
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# --- the broker ---------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Broker:
    def __init__(self, work):
        self.work = work
        self.port = free_port()
        self.admin_port = free_port()
        self.config = os.path.join(work, "herald.toml")
        with open(self.config, "w") as f:
            f.write(f"""
[node]
id = "churn"
data_dir = "{work}/data"

[listeners.tcp]
bind = "{HOST}:{self.port}"

[admin]
enabled = true
bind = "{HOST}:{self.admin_port}"

[instance]
id = "churn"
allow_anonymous = true
client_id_format = "any"

[[access_keys]]
id = "admin"
secret = "{ADMIN_SECRET}"
publish = ["#"]
subscribe = ["#", "$notice/#", "$presence/#"]
admin = true

[limits]
max_queued_messages = 1000000

[storage]
sync = "always"

[[sinks]]
id = "notices"
type = "mqtt"
topic = "$notice/{{clientId}}/{{eventType}}"
qos = 1

[[rules]]
id = "all"
kind = "status_notice"
source = {{ events = ["connect", "disconnect", "tcpclean"] }}
sinks = ["notices"]
""")
        self.log = open(os.path.join(work, "herald.log"), "ab")
        self.process = None

    def start(self):
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
        self.process = subprocess.Popen([BIN, "serve", "--config", self.config],
                                        stdout=self.log, stderr=self.log, env=env)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                socket.create_connection((HOST, self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise SystemExit(f"herald did not start; see {self.work}/herald.log")

    def kill(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def admin(self, path, method="GET"):
        """(status, body) of an admin API request with the admin key."""
        request = urllib.request.Request(f"http://{HOST}:{self.admin_port}{path}", method=method)
        token = base64.b64encode(f"admin:{ADMIN_SECRET}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, ""

    async def observer(self, client_id):
        """A connection with the admin key's Signature for `client_id`, its CONNECT written
        (clean session): one of the check's own clients, which read notices and snapshots."""
        password = base64.b64encode(
            hmac.new(ADMIN_SECRET.encode(), client_id.encode(), hashlib.sha1).digest()).decode()
        reader, writer = await asyncio.open_connection(HOST, self.port)
        writer.write(connect_packet(client_id, True, "Signature|admin|churn", password, 60))
        return reader, writer

    def metric(self, name):
        for line in self.admin("/metrics")[1].splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None


# --- phase 1: churn -----------------------------------------------------------------------

class Churn:
    def __init__(self, broker):
        self.broker = broker
        self.stats = collections.Counter()
        self.problems = []
        self.acked = set()
        # Connections that sent DISCONNECT: (client id, local port, time ms, the PUBLISHes sent
        # in the same write, not waited for).
        self.disconnected = []
        self.got = collections.Counter()
        self.notices = []
        self.connack_ms = []

    async def open(self, client_id, clean):
        started = time.monotonic()
        reader, writer = await asyncio.open_connection(HOST, self.broker.port)
        writer.write(connect_packet(client_id, clean))
        await writer.drain()
        try:
            header, body = await asyncio.wait_for(read_packet(reader), 3.0)
        except asyncio.TimeoutError:
            self.problems.append(f"{client_id}: neither CONNACK nor close within 3 s")
            writer.close()
            return None
        except (asyncio.IncompleteReadError, OSError):
            self.stats["closed before CONNACK (replaced by a newer CONNECT)"] += 1
            writer.close()
            return None
        if header != 0x20 or body[1] != 0:
            self.problems.append(f"{client_id}: unexpected CONNACK {header:#x} {body!r}")
            writer.close()
            return None
        self.connack_ms.append((time.monotonic() - started) * 1000)
        return reader, writer

    async def worker(self, client_id, worker, deadline):
        n = 0
        while time.monotonic() < deadline:
            connection = await self.open(client_id, random.random() < 0.3)
            if connection is None:
                continue
            reader, writer = connection
            mode = random.choice(["acked+disconnect", "acked+drop", "burst+disconnect", "hold"])
            try:
                if mode.startswith("acked"):
                    for _ in range(random.randint(1, 5)):
                        n += 1
                        packet_id = n % 65535 + 1
                        payload = f"{client_id}/{worker}/{n}".encode()
                        writer.write(publish_packet(f"churn/{client_id}", packet_id, payload))
                        await writer.drain()
                        while True:
                            header, body = await asyncio.wait_for(read_packet(reader), 3.0)
                            if header == 0x40 and struct.unpack(">H", body)[0] == packet_id:
                                self.acked.add(payload)
                                break
                    if mode == "acked+disconnect":
                        port = writer.get_extra_info("sockname")[1]
                        self.disconnected.append((client_id, port, time.time() * 1000, []))
                        writer.write(DISCONNECT)
                        await writer.drain()
                elif mode == "burst+disconnect":
                    port = writer.get_extra_info("sockname")[1]
                    payloads, data = [], b""
                    for _ in range(random.randint(1, 5)):
                        n += 1
                        payload = f"{client_id}/{worker}/{n}".encode()
                        payloads.append(payload)
                        data += publish_packet(f"churn/{client_id}", n % 65535 + 1, payload)
                    self.disconnected.append((client_id, port, time.time() * 1000, payloads))
                    writer.write(data + DISCONNECT)
                    await writer.drain()
                else:
                    await asyncio.sleep(random.uniform(0, 0.2))
                self.stats[mode] += 1
            except (asyncio.IncompleteReadError, OSError, asyncio.TimeoutError):
                self.stats[mode + " ended by the broker (taken over)"] += 1
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass

    async def kicker(self, deadline):
        """Closes a random client's connection through the admin API every 50 ms."""
        while time.monotonic() < deadline:
            path = f"/api/v1/clients/churn-{random.randrange(IDS)}/connection"
            status, _ = await asyncio.to_thread(self.broker.admin, path, "DELETE")
            self.stats[f"kick answered {status}"] += 1
            await asyncio.sleep(0.05)

    async def watcher(self, ready, stop):
        reader, writer = await self.broker.observer("churn-watcher")
        writer.write(subscribe_packet(1, "churn/#", 1) + subscribe_packet(2, "$notice/#", 1))
        await writer.drain()
        subacks = 0
        while subacks < 2:
            header, body = await read_packet(reader)
            if header == 0x20 and body[1] != 0:
                raise SystemExit(f"the watcher was refused: {body!r}")
            if header == 0x90:
                if body[2] & 0x80:
                    raise SystemExit("the watcher's subscription was refused")
                subacks += 1
        ready.set()
        while True:
            try:
                header, body = await asyncio.wait_for(read_packet(reader), 0.5)
            except asyncio.TimeoutError:
                if stop.is_set():
                    break
                continue
            if header >> 4 != 3:
                continue
            topic, packet_id, payload = parse_publish(header, body)
            if packet_id:
                writer.write(b"\x40\x02" + packet_id)
            if topic.startswith("$notice/"):
                self.notices.append(json.loads(payload))
            else:
                self.got[payload] += 1
        writer.close()

    async def run(self):
        ready, stop = asyncio.Event(), asyncio.Event()
        watcher = asyncio.create_task(self.watcher(ready, stop))
        await ready.wait()
        deadline = time.monotonic() + CHURN_SECS
        await asyncio.gather(self.kicker(deadline),
                             *[self.worker(f"churn-{i}", k, deadline)
                               for i in range(IDS) for k in range(WORKERS)])
        # Each client id connects once more and stays: while it does, its snapshot is that
        # channel's connect.
        holders = await asyncio.gather(*[self.open(f"churn-{i}", True) for i in range(IDS)])
        await self.notices_caught_up()
        self.check_snapshots(await self.read_snapshots(), "connected")
        for holder in holders:
            if holder:
                holder[1].write(DISCONNECT)
                holder[1].close()
        await asyncio.sleep(3)
        stop.set()
        await watcher
        self.check_snapshots(await self.read_snapshots(), "after all left")
        return self.check()

    async def notices_caught_up(self):
        """Waits until the watcher has read every notice so far: none for a second (at most
        30 s; the watcher reads the churn's tens of thousands of notices seconds behind)."""
        seen, quiet_since, started = len(self.notices), time.monotonic(), time.monotonic()
        while time.monotonic() - quiet_since < 1.0 and time.monotonic() - started < 30:
            await asyncio.sleep(0.1)
            if len(self.notices) != seen:
                seen, quiet_since = len(self.notices), time.monotonic()

    def check_snapshots(self, snapshots, when):
        """Each client's retained `$presence` snapshot must be its last event so far."""
        last = {}
        for e in self.notices:
            if e["clientId"] not in OBSERVERS \
                    and e["seq"] > last.get(e["clientId"], {}).get("seq", 0):
                last[e["clientId"]] = e
        wrong = []
        for client_id, e in last.items():
            state = snapshots.get(client_id)
            expected = {"seq": e["seq"], "lastEvent": e["eventType"], "channelId": e["channelId"],
                        "clientIp": e["clientIp"], "since": e["time"], "reason": e.get("reason"),
                        "online": e["eventType"] != "tcpclean"}
            if state is None or any(state.get(k) != v for k, v in expected.items()):
                wrong.append((client_id, state, expected))
        if wrong:
            self.problems.append(f"{when}: {len(wrong)} $presence snapshots are not the "
                                 f"client's last event, e.g. {wrong[:2]}")
        online = sum(1 for e in last.values() if e["eventType"] != "tcpclean")
        self.stats[f"snapshots checked {when} (online)"] = f"{len(last)} ({online})"

    async def read_snapshots(self):
        """Every client's retained `$presence` snapshot, by client id."""
        reader, writer = await self.broker.observer("churn-snapshots")
        writer.write(subscribe_packet(1, "$presence/+", 1))
        await writer.drain()
        snapshots = {}
        while True:
            try:
                header, body = await asyncio.wait_for(read_packet(reader), 1.0)
            except asyncio.TimeoutError:
                break
            if header == 0x90 and body[2] & 0x80:
                raise SystemExit("the subscription to $presence/+ was refused")
            if header >> 4 != 3:
                continue
            topic, packet_id, payload = parse_publish(header, body)
            if packet_id:
                writer.write(b"\x40\x02" + packet_id)
            state = json.loads(payload)
            snapshots[state["clientId"]] = state
        writer.write(DISCONNECT)
        writer.close()
        return snapshots

    def check(self):
        events = collections.defaultdict(list)
        seqs = collections.defaultdict(list)
        event_ids = collections.Counter()
        connects = {}
        for e in self.notices:
            if e["clientId"] in OBSERVERS:
                continue
            events[e["channelId"]].append((e["eventType"], e.get("reason")))
            seqs[e["clientId"]].append(e["seq"])
            event_ids[e["eventId"]] += 1
            if e["eventType"] == "connect":
                port = int(e["clientIp"].rsplit(":", 1)[1])
                connects.setdefault((e["clientId"], port), []).append((e["time"], e["channelId"]))
        reason = {}
        for channel, seen in events.items():
            kinds = [k for k, _ in seen]
            end = seen[-1][1]
            expected = ["connect", "disconnect", "tcpclean"] if end == "client_disconnect" \
                else ["connect", "tcpclean"]
            if kinds != expected:
                self.problems.append(f"channel {channel}: events {seen}")
            reason[channel] = end
        def channel_of(client_id, port, sent_ms):
            """The channel of the connection from `port` that sent at `sent_ms` (ports recur)."""
            candidates = [c for c in connects.get((client_id, port), []) if c[0] <= sent_ms + 5]
            return max(candidates)[1] if candidates else None

        lost_acked = [p for p in self.acked if not self.got[p]]
        # A channel whose client sent DISCONNECT ends `client_disconnect` (and then every
        # PUBLISH sent before it is delivered), or `taken_over`, `kicked` when that came first.
        lost_clean = []
        wrong_end = collections.Counter()
        for client_id, port, sent_ms, payloads in self.disconnected:
            end = reason.get(channel_of(client_id, port, sent_ms))
            if end == "client_disconnect":
                lost_clean += [p for p in payloads if not self.got[p]]
            elif end not in ("taken_over", "kicked"):
                wrong_end[end] += 1
        if wrong_end:
            self.problems.append(f"channels whose client sent DISCONNECT ended otherwise: "
                                 f"{dict(wrong_end)}")
        # Nothing here subscribes but the watcher, which reads everything.
        slow = sum(1 for r in reason.values() if r == "slow_consumer")
        if slow:
            self.problems.append(f"{slow} channels ended as slow consumers")
        connacks = len(self.connack_ms)
        connect_events = sum(1 for seen in events.values() if seen[0][0] == "connect")
        if connect_events != connacks:
            self.problems.append(f"{connacks} CONNACKs but {connect_events} connect events")
        if lost_acked:
            self.problems.append(f"{len(lost_acked)} acknowledged PUBLISHes not delivered, "
                                 f"e.g. {lost_acked[:3]}")
        if lost_clean:
            self.problems.append(f"{len(lost_clean)} PUBLISHes sent before a DISCONNECT that "
                                 f"ended its channel cleanly not delivered, e.g. {lost_clean[:3]}")
        duplicates = [i for i, count in event_ids.items() if count > 1]
        if duplicates:
            self.problems.append(f"{len(duplicates)} eventIds twice, e.g. {duplicates[:3]}")
        unordered = [c for c, s in seqs.items() if s != sorted(s) or len(set(s)) != len(s)]
        if unordered:
            self.problems.append(f"seq not increasing for {unordered[:3]}")
        connections = self.broker.metric("herald_connections")
        if connections != 0:
            self.problems.append(f"herald_connections is {connections} after every client left")
        delays = sorted(self.connack_ms) or [0.0]
        return {
            "phase": "churn", "connacks": connacks, "channels": len(events),
            "acked_publishes": len(self.acked), "tcpclean_reasons": dict(collections.Counter(reason.values())),
            "connack_p99_ms": round(delays[int(len(delays) * 0.99)], 2),
            "connack_max_ms": round(delays[-1], 2), "counts": dict(self.stats),
            "problems": self.problems,
        }


# --- phase 2: crash -----------------------------------------------------------------------

class Crash:
    def __init__(self, broker):
        self.broker = broker
        self.acked = collections.defaultdict(set)
        self.got = collections.defaultdict(set)
        self.problems = []
        self.stats = collections.Counter()
        self.subscribed = set()

    async def session(self, device, hold, how):
        try:
            reader, writer = await asyncio.open_connection(HOST, self.broker.port)
            writer.write(connect_packet(device, False))
            await writer.drain()
            header, body = await asyncio.wait_for(read_packet(reader), 3.0)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            self.stats["no connection (broker restarting or replaced)"] += 1
            await asyncio.sleep(0.05)
            return
        if header != 0x20 or body[1] != 0:
            self.problems.append(f"{device}: CONNACK {body!r}")
            writer.close()
            return
        if body[0] == 0:
            if device in self.subscribed:
                self.problems.append(f"{device}: its session was lost (session present 0)")
            self.subscribed.add(device)
            writer.write(subscribe_packet(1, f"cmd/{device}", 1))
        deadline = time.monotonic() + hold
        try:
            while (left := deadline - time.monotonic()) > 0:
                try:
                    header, body = await asyncio.wait_for(read_packet(reader), left)
                except asyncio.TimeoutError:
                    break
                if header >> 4 == 3:
                    _, packet_id, payload = parse_publish(header, body)
                    self.got[device].add(int(payload))
                    if how != "leave without acknowledging":
                        writer.write(b"\x40\x02" + packet_id)
            if how == "disconnect":
                writer.write(DISCONNECT)
                await writer.drain()
            elif how == "reset":
                reset_on_close(writer)
        except (asyncio.IncompleteReadError, OSError):
            pass
        writer.close()

    async def device(self, device, deadline):
        while time.monotonic() < deadline:
            how = random.choice(["disconnect", "drop", "reset", "leave without acknowledging"])
            await self.session(device, random.uniform(0, 0.3), how)

    async def commander(self, deadline):
        seq = 0
        while time.monotonic() < deadline:
            try:
                reader, writer = await asyncio.open_connection(HOST, self.broker.port)
                writer.write(connect_packet("churn-commander", True))
                await writer.drain()
                await read_packet(reader)
            except (OSError, asyncio.IncompleteReadError):
                await asyncio.sleep(0.05)
                continue
            pending = {}

            async def acks():
                while True:
                    header, body = await read_packet(reader)
                    if header == 0x40:
                        device, s = pending.pop(struct.unpack(">H", body)[0], (None, None))
                        if device:
                            self.acked[device].add(s)
            reading = asyncio.create_task(acks())
            try:
                while time.monotonic() < deadline and not reading.done():
                    for i in range(IDS):
                        seq += 1
                        pending[seq % 65535 + 1] = (f"crash-{i}", seq)
                        writer.write(publish_packet(f"cmd/crash-{i}", seq % 65535 + 1,
                                                    str(seq).encode()))
                    await writer.drain()
                    await asyncio.sleep(0.01)
                if not reading.done():
                    await asyncio.sleep(2)
            except OSError:
                pass
            reading.cancel()
            writer.close()

    async def killer(self, deadline):
        while time.monotonic() + 4 < deadline:
            await asyncio.sleep(4)
            self.broker.kill()
            self.stats["SIGKILLs"] += 1
            await asyncio.sleep(0.2)
            await asyncio.to_thread(self.broker.start)

    async def run(self):
        for i in range(IDS):
            await self.session(f"crash-{i}", 0.05, "disconnect")
        deadline = time.monotonic() + CRASH_SECS
        await asyncio.gather(self.commander(deadline), self.killer(deadline),
                             *[self.device(f"crash-{i}", deadline)
                               for i in range(IDS) for _ in range(WORKERS)])
        # Every device comes back once and takes what is left.
        await asyncio.gather(*[self.session(f"crash-{i}", 3, "disconnect") for i in range(IDS)])
        lost = {d: sorted(s - self.got[d]) for d, s in self.acked.items() if s - self.got[d]}
        if lost:
            total = sum(len(v) for v in lost.values())
            self.problems.append(f"{total} acknowledged commands never delivered, e.g. "
                                 f"{list(lost.items())[:2]}")
        return {"phase": "crash", "acked_commands": sum(len(s) for s in self.acked.values()),
                "counts": dict(self.stats), "problems": self.problems}


def main():
    # Writes to connections the broker has closed are expected here; asyncio would log each.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    if not os.path.exists(BIN):
        raise SystemExit(f"{BIN} not found: cargo build --release -p herald")
    work = tempfile.mkdtemp(prefix="herald-churn.")
    broker = Broker(work)
    failed = False
    try:
        broker.start()
        for phase in (Churn, Crash):
            result = asyncio.run(phase(broker).run())
            print(json.dumps(result))
            failed |= bool(result["problems"])
    finally:
        broker.stop()
    if failed:
        print(f"VIOLATIONS: see above; the broker's log is in {work}/herald.log")
        sys.exit(1)
    shutil.rmtree(work, ignore_errors=True)
    print("ok")


if __name__ == "__main__":
    main()
