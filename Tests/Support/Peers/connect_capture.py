"""A one-connection MQTT 5 peer over mutual TLS that records the CONNECT it receives.

Usage: connect_capture.py PORT CLIENT_CA CERT KEY OUT

It requires a client certificate from CLIENT_CA, writes the CONNECT packet as hex to OUT,
answers with a CONNACK (success, no session) whose properties a broker may legally send and
mosquitto does not (user properties, a topic alias maximum), then reads until the client
leaves. Prints "ready" once it listens.
"""
import os
import socket
import ssl
import sys


def varint(data, at):
    value, shift = 0, 0
    while True:
        b = data[at]
        at += 1
        value |= (b & 0x7F) << shift
        if b & 0x80 == 0:
            return value, at
        shift += 7


def read_packet(conn):
    data = b""
    while len(data) < 2 or not any(b & 0x80 == 0 for b in data[1:5]):
        chunk = conn.recv(1)
        if not chunk:
            raise EOFError("closed before a packet")
        data += chunk
    length, at = varint(data, 1)
    while len(data) < at + length:
        chunk = conn.recv(at + length - len(data))
        if not chunk:
            raise EOFError("closed mid-packet")
        data += chunk
    return data


def utf8(text):
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def main():
    port, ca, cert, key, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.load_verify_locations(ca)
    context.verify_mode = ssl.CERT_REQUIRED
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", int(port)))
    listener.listen(4)
    print("ready", flush=True)
    while True:  # a port probe that never speaks TLS is not the client
        raw, _ = listener.accept()
        try:
            conn = context.wrap_socket(raw, server_side=True)
            packet = read_packet(conn)
            break
        except (OSError, ssl.SSLError, EOFError):
            raw.close()
    with open(out + ".tmp", "w") as f:
        f.write(packet.hex())
    os.rename(out + ".tmp", out)
    props = b"\x26" + utf8("broker") + utf8("capture") + b"\x26" + utf8("broker") + utf8("twice")
    props += b"\x22\x00\x09"  # topic alias maximum 9
    body = b"\x00\x00" + bytes([len(props)]) + props
    conn.sendall(bytes([0x20, len(body)]) + body)
    try:
        while conn.recv(4096):
            pass
    except (OSError, ssl.SSLError):
        pass


if __name__ == "__main__":
    main()
