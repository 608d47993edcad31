/*
 * The TCTI EdgeKey puts in front of the real one. ESAPI talks to this guard, which forwards
 * every command unchanged and does two things on the way:
 *
 *   - it counts the commands (how EdgeKey proves "one TPM command per handshake" from the
 *     inside; the pcap TCTI proves it from the outside);
 *   - it bounds them. ESAPI's synchronous calls wait for the TPM forever: they pass the TCTI a
 *     timeout of -1 and loop while it answers TRY_AGAIN, and tpm2-tss 3.2's swtpm and mssim
 *     TCTIs read their socket without a deadline anyway. So the inner calls run on a worker
 *     thread of the guard's own, and the caller waits for it against a deadline per command
 *     (EDGEKEY_TPM_TIMEOUT_MS, longer for key generation). When the deadline passes the
 *     caller gets EDGEKEY_RC_TPM_TIMEOUT, which discards the ESAPI context
 *     (edgekey_rc_breaks_context); the worker is abandoned and frees the inner TCTI itself
 *     when its call finally returns. Inner TCTIs that honour a finite timeout (device, tabrmd)
 *     are given the remaining time, so an abandoned worker ends at the deadline too.
 *
 * Buffers the worker reads or writes are the guard's own, never the caller's: an abandoned
 * worker may finish long after ESAPI freed its command buffer.
 */
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <tss2/tss2_tcti.h>
#include <tss2/tss2_tctildr.h>

#include "internal.h"

#define GUARD_MAGIC 0x45444b5947524400ull /* "EDKYGRD" */
/* TPM2_MAX_COMMAND_SIZE on every TPM we know; ESAPI's buffers are this size too. */
#define GUARD_BUFFER 4096
/* Workers stuck in a TCTI that ignores timeouts (swtpm, mssim) after their caller gave up.
 * Beyond this many, commands fail at once until one returns: a TPM that hangs for hours must
 * not cost a thread per retry. */
#define MAX_STUCK_WORKERS 16

static atomic_int stuck_workers;

struct edgekey_tcti_stats {
  atomic_int refs;
  atomic_int stuck; /* this context's abandoned workers still inside an inner call */
};

edgekey_tcti_stats *edgekey_tcti_stats_new(void) {
  edgekey_tcti_stats *s = calloc(1, sizeof(*s));
  if (s != NULL) {
    atomic_init(&s->refs, 1);
    atomic_init(&s->stuck, 0);
  }
  return s;
}

static edgekey_tcti_stats *stats_ref(edgekey_tcti_stats *s) {
  if (s != NULL) atomic_fetch_add(&s->refs, 1);
  return s;
}

void edgekey_tcti_stats_unref(edgekey_tcti_stats *s) {
  if (s != NULL && atomic_fetch_sub(&s->refs, 1) == 1) free(s);
}

int edgekey_tcti_stats_stuck(const edgekey_tcti_stats *s) {
  return s == NULL ? 0 : atomic_load(&((edgekey_tcti_stats *)s)->stuck);
}

typedef enum { JOB_NONE, JOB_INIT, JOB_TRANSMIT, JOB_RECEIVE, JOB_QUIT } job_kind;

typedef struct {
  TSS2_TCTI_CONTEXT_COMMON_V2 common;
  TSS2_TCTI_CONTEXT *inner; /* owned: tctildr's context, finalized by whoever frees the guard */
  char *conf;               /* the TCTI string the worker opens inner with */
  atomic_uint_fast64_t *counter;
  edgekey_tcti_stats *stats; /* shared with the context, outlives it while workers are stuck */
  int32_t timeout_ms;
  int32_t long_timeout_ms;
  int32_t delay_ms; /* "delay:MS:" before the TCTI: each command takes this much longer */
  pid_t pid;

  /* Caller's side, touched only by the thread holding the edgekey_tpm lock. */
  struct timespec deadline; /* of the command in flight, CLOCK_MONOTONIC */
  int receiving;            /* a receive job was started and has not been collected */
  atomic_int broken;        /* a command timed out: the context must be discarded */

  /* Shared with the worker, under `lock`. */
  pthread_mutex_t lock;
  pthread_cond_t cond;
  int has_worker;
  pthread_t worker;
  job_kind job; /* set by the caller, JOB_NONE again when the worker finished it */
  int busy;     /* the worker is inside an inner call */
  int done;     /* the last job finished; `result` holds its code */
  int abandoned; /* freed while busy: the worker cleans up when its call returns */
  TSS2_RC result;
  size_t length;   /* transmit: command length; receive: capacity in, response length out */
  int query_size;  /* receive with a NULL buffer: the caller asks for the size only */
  uint8_t buffer[GUARD_BUFFER];
} guard_tcti;

static guard_tcti *self(TSS2_TCTI_CONTEXT *ctx) { return (guard_tcti *)ctx; }
void edgekey_tcti_guard_free(TSS2_TCTI_CONTEXT *guard);

static int is_long_command(uint32_t code) {
  switch (code) {
  case TPM2_CC_Create:
  case TPM2_CC_CreatePrimary:
  case TPM2_CC_CreateLoaded:
  case TPM2_CC_SelfTest:
    return 1;
  default:
    return 0;
  }
}

static void deadline_after(struct timespec *t, int32_t ms) {
  clock_gettime(CLOCK_MONOTONIC, t);
  t->tv_sec += ms / 1000;
  t->tv_nsec += (long)(ms % 1000) * 1000000L;
  if (t->tv_nsec >= 1000000000L) {
    t->tv_sec++;
    t->tv_nsec -= 1000000000L;
  }
}

/* Milliseconds until `t`, 0 when it has passed. */
static int32_t ms_until(const struct timespec *t) {
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  long long ms = (long long)(t->tv_sec - now.tv_sec) * 1000 + (t->tv_nsec - now.tv_nsec) / 1000000L;
  if (ms <= 0) return 0;
  return ms > INT32_MAX ? INT32_MAX : (int32_t)ms;
}

static void destroy(guard_tcti *g) {
  if (g->inner != NULL) Tss2_TctiLdr_Finalize(&g->inner);
  free(g->conf);
  edgekey_tcti_stats_unref(g->stats);
  pthread_cond_destroy(&g->cond);
  pthread_mutex_destroy(&g->lock);
  memset(g, 0, sizeof(*g));
  free(g);
}

static void *worker_main(void *arg) {
  guard_tcti *g = arg;
  pthread_mutex_lock(&g->lock);
  for (;;) {
    while (g->job == JOB_NONE) pthread_cond_wait(&g->cond, &g->lock);
    job_kind job = g->job;
    if (job == JOB_QUIT) break;
    g->busy = 1;
    struct timespec deadline = g->deadline;
    pthread_mutex_unlock(&g->lock);

    TSS2_RC rc;
    size_t length = g->length;
    if (job == JOB_INIT) {
      /* Opening can wait on the TPM too: the swtpm TCTI sets the locality over the control
       * channel, the device TCTI probes the device, tabrmd's asks the daemon over D-Bus. */
      rc = Tss2_TctiLdr_Initialize(g->conf, &g->inner);
    } else if (job == JOB_TRANSMIT) {
      rc = Tss2_Tcti_Transmit(g->inner, length, g->buffer);
      /* A real chip's time to answer (25-540 ms), which swtpm's 1 ms cannot show: counted
       * against the command's timeout like the chip's own time would be. */
      if (rc == TSS2_RC_SUCCESS && g->delay_ms > 0) {
        struct timespec wait = {g->delay_ms / 1000, (long)(g->delay_ms % 1000) * 1000000L};
        while (nanosleep(&wait, &wait) != 0 && errno == EINTR) {
        }
      }
    } else {
      /* The remaining time, for inner TCTIs that honour it; those that answer TRY_AGAIN
       * early are asked again until the deadline. */
      do {
        length = g->length;
        rc = Tss2_Tcti_Receive(g->inner, &length, g->query_size ? NULL : g->buffer,
                               ms_until(&deadline));
      } while ((rc & 0xFFFF) == TSS2_BASE_RC_TRY_AGAIN && ms_until(&deadline) > 0);
      if ((rc & 0xFFFF) == TSS2_BASE_RC_TRY_AGAIN) rc = EDGEKEY_RC_TPM_TIMEOUT;
    }

    pthread_mutex_lock(&g->lock);
    g->busy = 0;
    g->job = JOB_NONE;
    g->result = rc;
    g->length = length;
    g->done = 1;
    pthread_cond_broadcast(&g->cond);
    if (g->abandoned) {
      pthread_mutex_unlock(&g->lock);
      atomic_fetch_sub(&stuck_workers, 1);
      if (g->stats != NULL) atomic_fetch_sub(&g->stats->stuck, 1);
      destroy(g);
      return NULL;
    }
  }
  pthread_mutex_unlock(&g->lock);
  return NULL;
}

static int start_worker(guard_tcti *g) {
  if (g->has_worker) return 1;
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, 1u << 20);
  /* Signals are for the application's threads, never for this one. */
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  int ok = pthread_create(&g->worker, &attr, worker_main, g) == 0;
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  pthread_attr_destroy(&attr);
  g->has_worker = ok;
  return ok;
}

/* Hands `job` to the worker (unless one is in flight) and waits for it until `until`.
 * Returns 1 when it finished (result in g->result), 0 when `until` passed first. */
static int run_until(guard_tcti *g, job_kind job, const struct timespec *until) {
  pthread_mutex_lock(&g->lock);
  if (!g->busy && g->job == JOB_NONE && !g->done) {
    g->job = job;
    pthread_cond_broadcast(&g->cond);
  }
  int finished = 1;
  while (!g->done) {
    int r = pthread_cond_timedwait(&g->cond, &g->lock, until);
    if (r == ETIMEDOUT && !g->done) {
      finished = 0;
      break;
    }
  }
  if (finished) g->done = 0;
  pthread_mutex_unlock(&g->lock);
  return finished;
}

static TSS2_RC give_up(guard_tcti *g) {
  atomic_store(&g->broken, 1);
  g->receiving = 0;
  return EDGEKEY_RC_TPM_TIMEOUT;
}

static TSS2_RC transmit(TSS2_TCTI_CONTEXT *ctx, size_t size, const uint8_t *command) {
  guard_tcti *g = self(ctx);
  atomic_fetch_add(g->counter, 1);
  if (atomic_load(&g->broken)) return EDGEKEY_RC_TPM_TIMEOUT;
  if (command == NULL || size < 10 || size > sizeof(g->buffer)) return TSS2_TCTI_RC_BAD_VALUE;
  uint32_t code = (uint32_t)command[6] << 24 | (uint32_t)command[7] << 16 |
                  (uint32_t)command[8] << 8 | command[9];
  deadline_after(&g->deadline, is_long_command(code) ? g->long_timeout_ms : g->timeout_ms);
  if (atomic_load(&stuck_workers) >= MAX_STUCK_WORKERS) return give_up(g);
  if (!start_worker(g)) return TSS2_TCTI_RC_MEMORY;
  pthread_mutex_lock(&g->lock);
  memcpy(g->buffer, command, size);
  g->length = size;
  pthread_mutex_unlock(&g->lock);
  if (!run_until(g, JOB_TRANSMIT, &g->deadline)) return give_up(g);
  return g->result;
}

static TSS2_RC receive(TSS2_TCTI_CONTEXT *ctx, size_t *size, uint8_t *response, int32_t timeout) {
  guard_tcti *g = self(ctx);
  if (size == NULL) return TSS2_TCTI_RC_BAD_REFERENCE;
  if (atomic_load(&g->broken)) return EDGEKEY_RC_TPM_TIMEOUT;
  /* The caller's own timeout, when shorter than ours, ends in TRY_AGAIN with the receive
   * still running; the next call goes on waiting for it. */
  struct timespec until = g->deadline;
  int callers = 0;
  if (timeout >= 0 && timeout < ms_until(&g->deadline)) {
    deadline_after(&until, timeout);
    callers = 1;
  }
  if (!g->receiving) {
    pthread_mutex_lock(&g->lock);
    g->query_size = response == NULL;
    g->length = response != NULL && *size > sizeof(g->buffer) ? sizeof(g->buffer) : *size;
    pthread_mutex_unlock(&g->lock);
    g->receiving = 1;
  }
  if (!run_until(g, JOB_RECEIVE, &until)) {
    if (callers && ms_until(&g->deadline) > 0) return TSS2_TCTI_RC_TRY_AGAIN;
    return give_up(g);
  }
  g->receiving = 0;
  TSS2_RC rc = g->result;
  if (rc == EDGEKEY_RC_TPM_TIMEOUT) return give_up(g);
  if (rc == TSS2_RC_SUCCESS || rc == TSS2_TCTI_RC_INSUFFICIENT_BUFFER) {
    if (response != NULL && rc == TSS2_RC_SUCCESS) memcpy(response, g->buffer, g->length);
    *size = g->length;
  }
  return rc;
}

static void finalize(TSS2_TCTI_CONTEXT *ctx) {
  (void)ctx; /* edgekey_tcti_guard_free frees the guard and the inner TCTI */
}

static TSS2_RC cancel(TSS2_TCTI_CONTEXT *ctx) { return Tss2_Tcti_Cancel(self(ctx)->inner); }

static TSS2_RC get_poll_handles(TSS2_TCTI_CONTEXT *ctx, TSS2_TCTI_POLL_HANDLE *handles,
                                size_t *num) {
  return Tss2_Tcti_GetPollHandles(self(ctx)->inner, handles, num);
}

static TSS2_RC set_locality(TSS2_TCTI_CONTEXT *ctx, uint8_t locality) {
  return Tss2_Tcti_SetLocality(self(ctx)->inner, locality);
}

static TSS2_RC make_sticky(TSS2_TCTI_CONTEXT *ctx, TPM2_HANDLE *handle, uint8_t sticky) {
  return Tss2_Tcti_MakeSticky(self(ctx)->inner, handle, sticky);
}

TSS2_RC edgekey_tcti_guard_open(const char *conf, atomic_uint_fast64_t *counter,
                                edgekey_tcti_stats *stats, int32_t timeout_ms,
                                int32_t long_timeout_ms, TSS2_TCTI_CONTEXT **out) {
  *out = NULL;
  guard_tcti *g = calloc(1, sizeof(*g));
  if (g == NULL) return EDGEKEY_RC_MEMORY;
  /* "delay:MS:INNER" (tests and benchmarks: the latency of a real chip over swtpm). */
  while (strncmp(conf, "delay:", 6) == 0) {
    char *end = NULL;
    long ms = strtol(conf + 6, &end, 10);
    if (end == conf + 6 || *end != ':' || ms < 0 || ms > 60000) {
      free(g);
      return EDGEKEY_RC_BAD_ARGUMENT;
    }
    g->delay_ms += (int32_t)ms;
    conf = end + 1;
  }
  g->conf = strdup(conf);
  g->common.v1.magic = GUARD_MAGIC;
  g->common.v1.version = 2;
  g->common.v1.transmit = transmit;
  g->common.v1.receive = receive;
  g->common.v1.finalize = finalize;
  g->common.v1.cancel = cancel;
  g->common.v1.getPollHandles = get_poll_handles;
  g->common.v1.setLocality = set_locality;
  g->common.makeSticky = make_sticky;
  g->counter = counter;
  g->stats = stats_ref(stats);
  g->timeout_ms = timeout_ms;
  g->long_timeout_ms = long_timeout_ms;
  g->pid = getpid();
  atomic_init(&g->broken, 0);
  pthread_mutex_init(&g->lock, NULL);
  pthread_condattr_t attr;
  pthread_condattr_init(&attr);
  pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
  pthread_cond_init(&g->cond, &attr);
  pthread_condattr_destroy(&attr);
  if (g->conf == NULL || !start_worker(g)) {
    edgekey_tcti_guard_free((TSS2_TCTI_CONTEXT *)g);
    return EDGEKEY_RC_MEMORY;
  }
  TSS2_RC rc;
  if (atomic_load(&stuck_workers) >= MAX_STUCK_WORKERS) {
    rc = EDGEKEY_RC_TPM_TIMEOUT;
  } else {
    deadline_after(&g->deadline, timeout_ms);
    rc = run_until(g, JOB_INIT, &g->deadline) ? g->result : EDGEKEY_RC_TPM_TIMEOUT;
  }
  if (rc != TSS2_RC_SUCCESS) {
    edgekey_tcti_guard_free((TSS2_TCTI_CONTEXT *)g);
    return rc;
  }
  *out = (TSS2_TCTI_CONTEXT *)g;
  return TSS2_RC_SUCCESS;
}

void edgekey_tcti_guard_set_timeouts(TSS2_TCTI_CONTEXT *guard, int32_t timeout_ms,
                                     int32_t long_timeout_ms) {
  if (guard == NULL) return;
  self(guard)->timeout_ms = timeout_ms;
  self(guard)->long_timeout_ms = long_timeout_ms;
}

int edgekey_tcti_guard_broken(TSS2_TCTI_CONTEXT *guard) {
  return guard != NULL && atomic_load(&self(guard)->broken);
}

void edgekey_tcti_guard_free(TSS2_TCTI_CONTEXT *guard) {
  if (guard == NULL) return;
  guard_tcti *g = self(guard);
  if (g->pid != getpid()) {
    /* In a child after fork(): the worker is the parent's and its lock may be held there.
     * Close our copies of the inner TCTI's descriptors and nothing else. */
    if (g->inner != NULL) Tss2_TctiLdr_Finalize(&g->inner);
    free(g->conf);
    edgekey_tcti_stats_unref(g->stats);
    free(g);
    return;
  }
  pthread_mutex_lock(&g->lock);
  if (g->busy) {
    /* Stuck in the inner TCTI: it frees everything when that call returns, which may be as
     * soon as the lock is released, so nothing of `g` is read after that. */
    pthread_t worker = g->worker;
    g->abandoned = 1;
    atomic_fetch_add(&stuck_workers, 1);
    if (g->stats != NULL) atomic_fetch_add(&g->stats->stuck, 1);
    pthread_mutex_unlock(&g->lock);
    pthread_detach(worker);
    return;
  }
  int joined = g->has_worker;
  if (joined) {
    g->job = JOB_QUIT;
    pthread_cond_broadcast(&g->cond);
  }
  pthread_mutex_unlock(&g->lock);
  if (joined) pthread_join(g->worker, NULL);
  destroy(g);
}
