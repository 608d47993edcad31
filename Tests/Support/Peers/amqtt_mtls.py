"""amqtt (an MQTT 3.1.1-only broker from PyPI) as an mutual-TLS test peer.

Usage: amqtt_mtls.py PORT CAFILE CERTFILE KEYFILE

amqtt verifies a client certificate when one is offered but does not require one
(ssl.CERT_OPTIONAL); the tests need a broker that refuses clients without a certificate, so
the listener's context is made to require it. Prints "ready" once listening.
"""
import asyncio
import ssl
import sys

from amqtt.broker import Broker

port, cafile, certfile, keyfile = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]

original = Broker._create_ssl_context


def require_client_certificate(listener):
    context = original(listener)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


Broker._create_ssl_context = staticmethod(require_client_certificate)

config = {
    "listeners": {
        "default": {
            "type": "tcp",
            "bind": f"127.0.0.1:{port}",
            "ssl": True,
            "cafile": cafile,
            "certfile": certfile,
            "keyfile": keyfile,
        }
    },
    "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
}


async def main():
    broker = Broker(config)
    await broker.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


asyncio.run(main())
