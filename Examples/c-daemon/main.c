/*
 * A C telemetry publisher with a TPM-held key: the EdgeKey C API makes the mutual-TLS SSL_CTX
 * (the key never leaves the TPM: OpenSSL signs through EdgeKey's provider), and libmosquitto
 * uses it unchanged (MOSQ_OPT_SSL_CTX). Publishes COUNT QoS 1 messages and waits for every
 * PUBACK.
 *
 *   edgekey-c-daemon KEYFILE CERT.pem CA.pem HOST PORT TOPIC COUNT
 *   (the TPM: $EDGEKEY_TCTI, then $TPM2TOOLS_TCTI, then /dev/tpmrm0)
 *
 * Build: cmake -S CMake -B build && cmake --build build (this file is built as
 * edgekey-c-daemon), or against an installed EdgeKey with Examples/c-daemon/CMakeLists.txt.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mosquitto.h>

#include <edgekey.h>
#include <edgekey_tls.h>

static char *read_file(const char *path) {
  FILE *f = fopen(path, "rb");
  if (f == NULL) return NULL;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *text = n >= 0 ? malloc((size_t)n + 1) : NULL;
  if (text != NULL && fread(text, 1, (size_t)n, f) == (size_t)n) {
    text[n] = '\0';
  } else {
    free(text);
    text = NULL;
  }
  fclose(f);
  return text;
}

static int acknowledged;
static void on_publish(struct mosquitto *m, void *arg, int mid) { (void)m, (void)arg, (void)mid, acknowledged++; }

int main(int argc, char **argv) {
  if (argc != 8) {
    fprintf(stderr, "usage: %s KEYFILE CERT.pem CA.pem HOST PORT TOPIC COUNT\n", argv[0]);
    return 2;
  }
  const char *host = argv[4], *topic = argv[6];
  int port = atoi(argv[5]), count = atoi(argv[7]);
  char why[512];

  edgekey_tpm *tpm = NULL;
  edgekey_tpm_key *key = NULL;
  if (edgekey_tpm_open(NULL, &tpm, why, sizeof why) != 0) {
    fprintf(stderr, "TPM: %s\n", why);
    return 3;
  }
  if (edgekey_tpm_key_from_file(tpm, argv[1], NULL, 0, &key, why, sizeof why) != 0) {
    fprintf(stderr, "key %s: %s\n", argv[1], why);
    return 1;
  }
  char *chain = read_file(argv[2]), *trust = read_file(argv[3]);
  if (chain == NULL || trust == NULL) {
    fprintf(stderr, "cannot read %s or %s\n", argv[2], argv[3]);
    return 1;
  }
  edgekey_tls_config config = {.chain_pem = chain, .key = key, .trust_pem = trust, .server_name = host};
  edgekey_tls_status status;
  SSL_CTX *ctx = edgekey_tls_client_ctx(&config, &status, why, sizeof why);
  if (ctx == NULL) {
    fprintf(stderr, "TLS context: %s\n", why);
    return 1;
  }

  mosquitto_lib_init();
  struct mosquitto *m = mosquitto_new("edgekey-c-daemon", true, NULL);
  mosquitto_int_option(m, MOSQ_OPT_SSL_CTX_WITH_DEFAULTS, 0);
  mosquitto_void_option(m, MOSQ_OPT_SSL_CTX, ctx);
  mosquitto_publish_callback_set(m, on_publish);
  int rc = mosquitto_connect(m, host, port, 30);
  for (int i = 0; rc == MOSQ_ERR_SUCCESS && i < count; i++) {
    char payload[64];
    int n = snprintf(payload, sizeof payload, "{\"reading\":%d}", i);
    rc = mosquitto_publish(m, NULL, topic, n, payload, 1, false);
  }
  for (int rounds = 0; rc == MOSQ_ERR_SUCCESS && acknowledged < count && rounds < 300; rounds++)
    rc = mosquitto_loop(m, 100, 1);
  if (rc != MOSQ_ERR_SUCCESS) {
    /* The handshake may fail in mosquitto_connect or, with TLS 1.3, on the first read after it:
     * either way the context knows which side failed, which certificate and why. */
    edgekey_tls_failure failure;
    SSL *ssl = mosquitto_ssl_get(m);
    edgekey_tls_layer layer = ssl != NULL ? edgekey_tls_diagnose(ssl, SSL_ERROR_SSL, &failure)
                                          : edgekey_tls_last_failure(ctx, &failure);
    if (layer != EDGEKEY_LAYER_NONE && layer != EDGEKEY_LAYER_NETWORK)
      fprintf(stderr, "connection failed: %s\n", failure.reason);
    else
      fprintf(stderr, "connection failed: %s\n", mosquitto_strerror(rc));
  }
  printf("published %d, acknowledged %d\n", count, acknowledged);
  mosquitto_disconnect(m);
  mosquitto_destroy(m);
  mosquitto_lib_cleanup();
  SSL_CTX_free(ctx);
  edgekey_tpm_key_free(key);
  edgekey_tpm_unref(tpm);
  free(chain);
  free(trust);
  return acknowledged == count ? 0 : 1;
}
