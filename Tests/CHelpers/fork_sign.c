#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "edgekey_test_helpers.h"

struct holder {
  edgekey_tpm *tpm;
  int ready[2];
  int hold_ms;
};

static void *hold_lock(void *arg) {
  struct holder *h = arg;
  TSS2_RC rc;
  edgekey_tpm_acquire(h->tpm, &rc);
  char c = 1;
  (void)!write(h->ready[1], &c, 1);
  struct timespec ts = {h->hold_ms / 1000, (long)(h->hold_ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
  edgekey_tpm_release(h->tpm);
  return NULL;
}

static int write_all(int fd, const uint8_t *p, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w <= 0) return -1;
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

int edgekey_test_sign_in_child(edgekey_tpm_key *key, TPMI_ALG_SIG_SCHEME scheme, TPMI_ALG_HASH hash,
                               const uint8_t *digest, size_t digest_len, uint8_t *sig, size_t cap,
                               size_t *sig_len, int hold_ms) {
  int out[2];
  if (pipe(out) != 0) return -1;
  struct holder h = {edgekey_tpm_key_context(key), {-1, -1}, hold_ms};
  pthread_t thread;
  int holding = 0;
  if (hold_ms > 0) {
    if (pipe(h.ready) != 0) return -1;
    if (pthread_create(&thread, NULL, hold_lock, &h) != 0) return -1;
    holding = 1;
    char c;
    (void)!read(h.ready[0], &c, 1); /* the other thread now holds the lock */
  }
  pid_t pid = fork();
  if (pid == 0) {
    /* The test runner may block signals; a blocked SIGALRM would turn a deadlock into a hang. */
    sigset_t alrm;
    sigemptyset(&alrm);
    sigaddset(&alrm, SIGALRM);
    pthread_sigmask(SIG_UNBLOCK, &alrm, NULL);
    signal(SIGALRM, SIG_DFL);
    alarm(10);
    close(out[0]);
    TPMT_SIGNATURE s;
    uint8_t buf[1024];
    size_t len = 0;
    if (edgekey_tpm_key_sign(key, scheme, hash, digest, digest_len, &s, NULL) != 0) _exit(2);
    if (edgekey_signature_encode(&s, buf, sizeof(buf), &len) != 0) _exit(3);
    if (write_all(out[1], buf, len) != 0) _exit(4);
    edgekey_tpm_key_unload(key); /* no resource manager on swtpm: do not leak the slot */
    _exit(0);
  }
  close(out[1]);
  if (holding) {
    pthread_join(thread, NULL);
    close(h.ready[0]);
    close(h.ready[1]);
  }
  if (pid < 0) {
    close(out[0]);
    return -1;
  }
  size_t got = 0;
  for (;;) {
    ssize_t r = read(out[0], sig + got, cap - got);
    if (r <= 0) break;
    got += (size_t)r;
    if (got == cap) break;
  }
  close(out[0]);
  *sig_len = got;
  int status = 0;
  waitpid(pid, &status, 0);
  return status;
}
