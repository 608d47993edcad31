#include "edgekey_anchor.h"

#include <mosquitto.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
  pthread_mutex_t lock;
  pthread_cond_t changed;
  int connected;
  int acknowledged;
} anchor_state;

static void on_connect(struct mosquitto *m, void *obj, int rc) {
  (void)m;
  anchor_state *s = obj;
  pthread_mutex_lock(&s->lock);
  s->connected = rc == 0 ? 1 : -1;
  pthread_cond_broadcast(&s->changed);
  pthread_mutex_unlock(&s->lock);
}

static void on_publish(struct mosquitto *m, void *obj, int mid) {
  (void)m, (void)mid;
  anchor_state *s = obj;
  pthread_mutex_lock(&s->lock);
  s->acknowledged++;
  pthread_cond_broadcast(&s->changed);
  pthread_mutex_unlock(&s->lock);
}

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

double edgekey_anchor_publish(const char *host, int port, SSL_CTX *ctx, int count, int payload_size,
                              int protocol_version) {
  anchor_state s = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0};
  mosquitto_lib_init();
  struct mosquitto *m = mosquitto_new("bench-anchor", true, &s);
  if (m == NULL) return -1;
  mosquitto_int_option(m, MOSQ_OPT_PROTOCOL_VERSION, protocol_version);
  mosquitto_int_option(m, MOSQ_OPT_TCP_NODELAY, 1);
  mosquitto_int_option(m, MOSQ_OPT_SSL_CTX_WITH_DEFAULTS, 0);
  mosquitto_void_option(m, MOSQ_OPT_SSL_CTX, ctx);
  mosquitto_connect_callback_set(m, on_connect);
  mosquitto_publish_callback_set(m, on_publish);
  int rc = mosquitto_connect(m, host, port, 60);
  if (rc == MOSQ_ERR_SUCCESS) rc = mosquitto_loop_start(m);
  if (rc != MOSQ_ERR_SUCCESS) {
    mosquitto_destroy(m);
    return -rc;
  }
  pthread_mutex_lock(&s.lock);
  while (s.connected == 0) pthread_cond_wait(&s.changed, &s.lock);
  pthread_mutex_unlock(&s.lock);
  double result = -1;
  if (s.connected > 0) {
    char *payload = calloc(1, (size_t)payload_size + 1);
    memset(payload, 'x', (size_t)payload_size);
    double start = now();
    for (int i = 0; i < count; i++) mosquitto_publish(m, NULL, "bench/anchor", payload_size, payload, 1, false);
    pthread_mutex_lock(&s.lock);
    while (s.acknowledged < count) pthread_cond_wait(&s.changed, &s.lock);
    pthread_mutex_unlock(&s.lock);
    result = count / (now() - start);
    free(payload);
  }
  mosquitto_disconnect(m);
  mosquitto_loop_stop(m, false);
  mosquitto_destroy(m);
  return result;
}
