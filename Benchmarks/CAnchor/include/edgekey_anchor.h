/* The anchor of the MQTT benchmark: a plain libmosquitto C publisher, written the way its
 * documentation shows (mosquitto_loop_start, then mosquitto_publish in a loop). */
#ifndef EDGEKEY_ANCHOR_H
#define EDGEKEY_ANCHOR_H
#include <openssl/ssl.h>

/* Connects with `ctx` (MOSQ_OPT_SSL_CTX), publishes `count` QoS 1 messages of `payload_size`
 * bytes and waits for every PUBACK. Returns messages per second from the first publish to
 * the last acknowledgement, or a negative libmosquitto error. */
double edgekey_anchor_publish(const char *host, int port, SSL_CTX *ctx, int count, int payload_size,
                              int protocol_version);
#endif
