"""MQTT 3.1.1 packets as bytes, for the scripts' standard-library clients (no client package)."""
import struct


def remaining_length(n):
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def utf8(text):
    data = text.encode()
    return struct.pack(">H", len(data)) + data


def packet(first_byte, body):
    return bytes([first_byte]) + remaining_length(len(body)) + body


def connect_packet(client_id, clean=True, user=None, password=None, keep_alive=30):
    flags = (0x02 if clean else 0) | (0x80 if user else 0) | (0x40 if password else 0)
    body = utf8("MQTT") + bytes([4, flags]) + struct.pack(">H", keep_alive) + utf8(client_id)
    if user:
        body += utf8(user)
    if password:
        body += utf8(password)
    return packet(0x10, body)


def publish_packet(topic, packet_id, payload):
    """QoS 1 with a packet id, QoS 0 with `None`."""
    if packet_id is None:
        return packet(0x30, utf8(topic) + payload)
    return packet(0x32, utf8(topic) + struct.pack(">H", packet_id) + payload)


def subscribe_packet(packet_id, topic_filter, qos):
    return packet(0x82, struct.pack(">H", packet_id) + utf8(topic_filter) + bytes([qos]))


DISCONNECT = b"\xe0\x00"


async def read_packet(reader):
    """(first byte, body) of the next packet from an asyncio stream."""
    header = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return header, (await reader.readexactly(length) if length else b"")


def parse_publish(header, body):
    """(topic, packet id bytes or None, payload)"""
    topic_len = struct.unpack(">H", body[:2])[0]
    topic = body[2:2 + topic_len].decode()
    offset = 2 + topic_len
    packet_id = None
    if (header >> 1) & 3:
        packet_id = body[offset:offset + 2]
        offset += 2
    return topic, packet_id, body[offset:]
