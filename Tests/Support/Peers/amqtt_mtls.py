"""amqtt (an MQTT 3.1.1-only broker from PyPI) as an mutual-TLS test peer.

Usage: amqtt_mtls.py PORT CAFILE CERTFILE KEYFILE

amqtt verifies a client certificate when one is offered but does not require one
(ssl.CERT_OPTIONAL); the tests need a broker that refuses clients without a certificate, so
the listener's context is made to require it, and a client with a certificate is not counted
as anonymous (amqtt keeps no session for an anonymous one). Prints "ready" once listening.
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

# Every client here proved its identity with a certificate the listener required, so none is
# anonymous: amqtt keeps no session (and queues nothing) for a client it counts as anonymous,
# and its anonymous plugin counts every client so. (mosquitto's use_identity_as_username.)
from amqtt.plugins.authentication import AnonymousAuthPlugin

original_authenticate = AnonymousAuthPlugin.authenticate


async def authenticate_by_certificate(self, *, session):
    ok = await original_authenticate(self, session=session)
    if ok and session is not None:
        session.is_anonymous = False
    return ok


AnonymousAuthPlugin.authenticate = authenticate_by_certificate

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
