/* The process's ESAPI context for one TPM: TCTI resolution, lock, fork, SRK, leak recovery. */
#include <stdarg.h>
#include <stdint.h>
#include <time.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <tss2/tss2_rc.h>
#include <tss2/tss2_tctildr.h>

#include "internal.h"

#define DEFAULT_TCTI "device:/dev/tpmrm0"

/*
 * Every open context, so that fork() cannot copy a context's lock while another thread holds
 * it (the child would block forever on its first TPM command). The prepare handler takes every
 * context's lock — waiting for a TPM command in flight to finish — and both sides release them
 * after the fork. The child re-creates its ESAPI context on first use (the pid changed).
 * Lock order: `registry_lock` before any context's lock; no code holding a context's lock
 * takes `registry_lock`.
 */
static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static edgekey_tpm *registry_head;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

/* How long fork() waits for a TPM command in flight on another thread before going ahead. */
#define FORK_WAIT_SECONDS 5

static void atfork_prepare(void) {
  pthread_mutex_lock(&registry_lock);
  struct timespec deadline;
  clock_gettime(CLOCK_REALTIME, &deadline);
  deadline.tv_sec += FORK_WAIT_SECONDS;
  for (edgekey_tpm *t = registry_head; t != NULL; t = t->next_open) {
    /* A TPM that hangs (until the ESAPI timeout) must not hang fork() with it: after the
     * deadline the child gets a fresh lock instead (atfork_child). */
    t->fork_locked = pthread_mutex_timedlock(&t->lock, &deadline) == 0;
  }
}

static void atfork_parent(void) {
  for (edgekey_tpm *t = registry_head; t != NULL; t = t->next_open)
    if (t->fork_locked) pthread_mutex_unlock(&t->lock);
  pthread_mutex_unlock(&registry_lock);
}

static void atfork_child(void) {
  /* The child's only thread is the one that took these locks in prepare: it may release them.
   * A lock that another (now absent) thread held is replaced; the ESAPI context under it is
   * re-created on first use anyway, because the pid changed. */
  for (edgekey_tpm *t = registry_head; t != NULL; t = t->next_open) {
    if (t->fork_locked)
      pthread_mutex_unlock(&t->lock);
    else
      pthread_mutex_init(&t->lock, NULL);
  }
  pthread_mutex_unlock(&registry_lock);
}

/*
 * At exit, flush the keys still loaded through a TCTI without a resource manager: nobody else
 * would (a kernel RM or tabrmd flushes a closed connection's objects), and the TPM has 3 slots
 * for everyone after us. Swift's exit() and C's exit() run this; a signal's death does not,
 * which is what the flush at open and on a full slot table are for. Each context gets one
 * second: a TPM command in flight on another thread, or a TPM that hangs, must not hold up exit.
 */
#define EXIT_FLUSH_MS 1000

static void flush_at_exit(void) {
  if (pthread_mutex_trylock(&registry_lock) != 0) return;
  struct timespec deadline;
  clock_gettime(CLOCK_REALTIME, &deadline);
  deadline.tv_sec += 1;
  for (edgekey_tpm *t = registry_head; t != NULL; t = t->next_open) {
    if (!t->direct || t->pid != getpid()) continue;
    if (pthread_mutex_timedlock(&t->lock, &deadline) != 0) continue;
    if (t->esys != NULL && t->loaded != NULL) {
      edgekey_tcti_guard_set_timeouts(t->guard, EXIT_FLUSH_MS, EXIT_FLUSH_MS);
      edgekey_tpm_unload_all_locked(t, t->esys);
      edgekey_tcti_guard_set_timeouts(t->guard, t->timeout_ms, t->long_timeout_ms);
    }
    pthread_mutex_unlock(&t->lock);
  }
  pthread_mutex_unlock(&registry_lock);
}

/* Tss2_RC_Decode's text for EdgeKey's own layer (12), so every decoder of TSS2 codes reads them. */
static const char *decode_edgekey_rc(TSS2_RC rc) {
  switch (rc & 0xFFFF) {
  case EDGEKEY_RC_NO_TPM & 0xFFFF: return "no TPM answered";
  case EDGEKEY_RC_BAD_KEYFILE & 0xFFFF: return "not a loadable TSS2 PRIVATE KEY";
  case EDGEKEY_RC_BAD_ARGUMENT & 0xFFFF: return "invalid argument";
  case EDGEKEY_RC_MEMORY & 0xFFFF: return "out of memory";
  case EDGEKEY_RC_SRK_MISMATCH & 0xFFFF: return "0x81000001 is not the standard SRK";
  case EDGEKEY_RC_NOT_A_SIGNING_KEY & 0xFFFF: return "not an unrestricted signing key";
  case EDGEKEY_RC_AUTH_REQUIRED & 0xFFFF: return "the key has a password and none was given";
  case EDGEKEY_RC_TPM_TIMEOUT & 0xFFFF: return "the TPM did not answer in time";
  default: return NULL;
  }
}

static void install_process_hooks(void);

void edgekey_install_process_hooks(void) { pthread_once(&atfork_once, install_process_hooks); }

static void install_process_hooks(void) {
  pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
  atexit(flush_at_exit);
  Tss2_RC_SetHandler(12, "edgekey", decode_edgekey_rc);
  /* tpm2-tss prints ERROR and WARNING lines on stderr for conditions EdgeKey handles itself
   * (a full slot table it makes room in, a TPM it reconnects to) and reports through its own
   * errors and Logger: quiet unless the operator asked for them (TSS2_LOG set). Done once,
   * before the first TSS call of the process that could read it. */
  setenv("TSS2_LOG", "all+none", 0);
}

static void registry_add(edgekey_tpm *tpm) {
  pthread_once(&atfork_once, install_process_hooks);
  pthread_mutex_lock(&registry_lock);
  tpm->next_open = registry_head;
  registry_head = tpm;
  pthread_mutex_unlock(&registry_lock);
}

static void registry_remove(edgekey_tpm *tpm) {
  pthread_mutex_lock(&registry_lock);
  for (edgekey_tpm **p = &registry_head; *p != NULL; p = &(*p)->next_open) {
    if (*p == tpm) {
      *p = tpm->next_open;
      break;
    }
  }
  pthread_mutex_unlock(&registry_lock);
}

TSS2_RC edgekey_rc_base(TSS2_RC rc) {
  /* Only TPM-layer format-one codes carry a parameter/handle/session number (bits 8-11). */
  if ((rc & TSS2_RC_LAYER_MASK) == 0 && (rc & TPM2_RC_FMT1)) return rc & 0xBF;
  return rc;
}

TSS2_RC edgekey_rc_base_public(TSS2_RC rc) { return edgekey_rc_base(rc); }

int edgekey_rc_is_missing_object(TSS2_RC rc) {
  TSS2_RC base = edgekey_rc_base(rc);
  if ((rc & TSS2_RC_LAYER_MASK) != 0) return 0;
  /* Format one, handle error: P (0x40) and S (0x800) clear, the handle's number in 0x700. */
  int is_handle_error = (rc & TPM2_RC_FMT1) && !(rc & TPM2_RC_P) && !(rc & TPM2_RC_S) &&
                        (rc & 0x700) != 0;
  if (base == TPM2_RC_HANDLE || base == TPM2_RC_VALUE) return is_handle_error;
  /* Format-zero warning codes 0x910..0x916: TPM2_RC_REFERENCE_H0..H6 */
  return rc >= TPM2_RC_REFERENCE_H0 && rc <= TPM2_RC_REFERENCE_H6;
}

static void append_why(char *why, size_t why_len, const char *fmt, ...) {
  if (why == NULL || why_len == 0) return;
  size_t used = strnlen(why, why_len);
  if (used + 1 >= why_len) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(why + used, why_len - used, fmt, ap);
  va_end(ap);
}

/*
 * Whether a resource manager sits between us and the TPM. Only the two we know are taken as
 * one: tpm2-abrmd ("tabrmd", or its library's file name) and the kernel's /dev/tpmrm*.
 * Everything else is direct, however it is spelled: swtpm, mssim, libtpms, /dev/tpm0, the
 * pcap TCTI around any of them ("pcap:swtpm:..."), a library path, a TCTI we do not know.
 * Being wrong that way is harmless: under a resource manager a connection sees only its own
 * transient objects, so flushing "everything" it sees flushes only ours.
 */
static int tcti_is_direct(const char *tcti) {
  for (;;) {
    if (strncmp(tcti, "pcap:", 5) == 0) { /* the pcap TCTI's config is the inner TCTI */
      tcti += 5;
    } else if (strncmp(tcti, "delay:", 6) == 0 && strchr(tcti + 6, ':') != NULL) {
      tcti = strchr(tcti + 6, ':') + 1; /* our latency wrapper around the inner TCTI */
    } else {
      break;
    }
  }
  if (strncmp(tcti, "libtss2-tcti-", 13) == 0) tcti += 13;
  if (strncmp(tcti, "tabrmd", 6) == 0) return 0;
  if (strncmp(tcti, "device", 6) == 0) {
    const char *path = strchr(tcti, ':');
    /* tctildr's "device" without a path means /dev/tpm0: the raw chip. */
    return path == NULL || strstr(path, "tpmrm") == NULL;
  }
  return 1;
}

static int32_t env_ms(const char *name, int32_t fallback) {
  const char *env = getenv(name);
  long v = env != NULL ? strtol(env, NULL, 10) : 0;
  return v > 0 && v < INT32_MAX ? (int32_t)v : fallback;
}

int32_t edgekey_tpm_timeout_ms(void) {
  return env_ms("EDGEKEY_TPM_TIMEOUT_MS", EDGEKEY_DEFAULT_TPM_TIMEOUT_MS);
}

int32_t edgekey_tpm_keygen_timeout_ms(void) {
  return env_ms("EDGEKEY_TPM_KEYGEN_TIMEOUT_MS", EDGEKEY_DEFAULT_TPM_KEYGEN_TIMEOUT_MS);
}

/* The guard TCTI (which owns tctildr's) and the ESAPI context on top. */
typedef struct {
  TSS2_TCTI_CONTEXT *guard;
  ESYS_CONTEXT *esys;
} esys_stack;

/* Opens the stack; the caller decides what a failure means. */
static TSS2_RC open_esys(const char *tcti, esys_stack *st, atomic_uint_fast64_t *counter,
                         edgekey_tcti_stats *stats, int32_t timeout_ms, int32_t long_timeout_ms) {
  st->guard = NULL;
  st->esys = NULL;
  TSS2_RC rc =
      edgekey_tcti_guard_open(tcti, counter, stats, timeout_ms, long_timeout_ms, &st->guard);
  if (rc != TSS2_RC_SUCCESS) return rc;
  rc = Esys_Initialize(&st->esys, st->guard, NULL);
  if (rc != TSS2_RC_SUCCESS) {
    edgekey_tcti_guard_free(st->guard);
    st->guard = NULL;
  }
  return rc;
}

static void close_esys(esys_stack *st) {
  if (st->esys != NULL) Esys_Finalize(&st->esys);
  edgekey_tcti_guard_free(st->guard);
  st->guard = NULL;
}

/* One candidate: open and start up. The TPM answering with any TPM-layer code counts as up. */
static TSS2_RC try_candidate(const char *tcti, esys_stack *st, atomic_uint_fast64_t *counter,
                             edgekey_tcti_stats *stats, const char **stage) {
  *stage = "opening the TCTI";
  TSS2_RC rc = open_esys(tcti, st, counter, stats, edgekey_tpm_timeout_ms(),
                         edgekey_tpm_keygen_timeout_ms());
  if (rc != TSS2_RC_SUCCESS) return rc;
  *stage = "TPM2_Startup";
  rc = Esys_Startup(st->esys, TPM2_SU_CLEAR);
  if (rc == TSS2_RC_SUCCESS || rc == TPM2_RC_INITIALIZE) return TSS2_RC_SUCCESS;
  if ((rc & TSS2_RC_LAYER_MASK) == TSS2_TPM_RC_LAYER) return TSS2_RC_SUCCESS;
  close_esys(st);
  return rc;
}

TSS2_RC edgekey_tpm_flush_all_transients_locked(edgekey_tpm *tpm, ESYS_CONTEXT *esys,
                                                int *flushed) {
  /* Ours first (their handles are known), then whatever else the TPM holds. */
  int ours = 0;
  for (edgekey_tpm_key *k = tpm->loaded; k != NULL; k = k->next_loaded) ours++;
  edgekey_tpm_unload_all_locked(tpm, esys);
  TSS2_RC rc = edgekey_tpm_flush_foreign_locked(tpm, esys, ESYS_TR_NONE, flushed);
  *flushed += ours;
  return rc;
}

TSS2_RC edgekey_tpm_flush_foreign_locked(edgekey_tpm *tpm, ESYS_CONTEXT *esys, ESYS_TR keep,
                                         int *flushed) {
  TPMS_CAPABILITY_DATA *cap = NULL;
  TPMI_YES_NO more = TPM2_NO;
  *flushed = 0;
  TSS2_RC rc = Esys_GetCapability(esys, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, TPM2_CAP_HANDLES,
                                  TPM2_TRANSIENT_FIRST, TPM2_MAX_CAP_HANDLES, &more, &cap);
  if (rc != TSS2_RC_SUCCESS) goto out;
  TPM2_HANDLE ours[TPM2_MAX_CAP_HANDLES];
  size_t n_ours = 0;
  for (edgekey_tpm_key *k = tpm->loaded; k != NULL && n_ours < TPM2_MAX_CAP_HANDLES;
       k = k->next_loaded)
    if (Esys_TR_GetTpmHandle(esys, k->handle, &ours[n_ours]) == TSS2_RC_SUCCESS) n_ours++;
  if (keep != ESYS_TR_NONE && n_ours < TPM2_MAX_CAP_HANDLES &&
      Esys_TR_GetTpmHandle(esys, keep, &ours[n_ours]) == TSS2_RC_SUCCESS)
    n_ours++;
  for (UINT32 i = 0; i < cap->data.handles.count; i++) {
    TPM2_HANDLE handle = cap->data.handles.handle[i];
    int mine = 0;
    for (size_t j = 0; j < n_ours; j++) mine |= ours[j] == handle;
    if (mine) continue;
    ESYS_TR object = ESYS_TR_NONE;
    if (Esys_TR_FromTPMPublic(esys, handle, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &object) !=
        TSS2_RC_SUCCESS)
      continue;
    if (Esys_FlushContext(esys, object) == TSS2_RC_SUCCESS)
      (*flushed)++;
    else
      Esys_TR_Close(esys, &object);
  }
out:
  Esys_Free(cap);
  return rc;
}

int edgekey_tpm_make_room_locked(edgekey_tpm *tpm, ESYS_CONTEXT *esys, edgekey_tpm_key *keep,
                                 ESYS_TR keep_parent) {
  if (edgekey_tpm_evict_lru_locked(tpm, esys, keep)) return 1;
  if (!tpm->direct) return 0;
  int flushed = 0;
  edgekey_tpm_flush_foreign_locked(tpm, esys, keep_parent, &flushed);
  atomic_fetch_add(&tpm->leaked_flushed, flushed);
  return flushed > 0;
}

int edgekey_tpm_make_room(edgekey_tpm *tpm, ESYS_CONTEXT *esys, ESYS_TR keep) {
  return edgekey_tpm_make_room_locked(tpm, esys, NULL, keep);
}

int edgekey_tcti_candidates(const char *tcti, const char *out[4]) {
  int n = 0;
  if (tcti != NULL && tcti[0] != '\0') out[n++] = tcti;
  const char *env = getenv("EDGEKEY_TCTI");
  if (env != NULL && env[0] != '\0') out[n++] = env;
  env = getenv("TPM2TOOLS_TCTI");
  if (env != NULL && env[0] != '\0') out[n++] = env;
  out[n++] = DEFAULT_TCTI;
  return n;
}

TSS2_RC edgekey_tpm_open_exact(const char *tcti, edgekey_tpm **out, char *why, size_t why_len) {
  pthread_once(&atfork_once, install_process_hooks);
  if (why != NULL && why_len > 0) why[0] = '\0';
  if (out == NULL || tcti == NULL) return EDGEKEY_RC_BAD_ARGUMENT;
  *out = NULL;
  edgekey_tpm *tpm = calloc(1, sizeof(*tpm));
  char *name = strdup(tcti);
  edgekey_tcti_stats *stats = edgekey_tcti_stats_new();
  if (tpm == NULL || name == NULL || stats == NULL) {
    free(tpm);
    free(name);
    edgekey_tcti_stats_unref(stats);
    return EDGEKEY_RC_MEMORY;
  }
  atomic_init(&tpm->commands, 0);
  esys_stack st;
  const char *stage = "";
  TSS2_RC rc = try_candidate(tcti, &st, &tpm->commands, stats, &stage);
  if (rc != TSS2_RC_SUCCESS) {
    append_why(why, why_len, "%s failed: %s", stage, Tss2_RC_Decode(rc));
    free(tpm);
    free(name);
    edgekey_tcti_stats_unref(stats);
    return rc;
  }
  tpm->stats = stats;
  ESYS_CONTEXT *esys = st.esys;
  pthread_mutex_init(&tpm->lock, NULL);
  atomic_init(&tpm->refs, 1);
  tpm->tcti = name;
  tpm->guard = st.guard;
  tpm->timeout_ms = edgekey_tpm_timeout_ms();
  tpm->long_timeout_ms = edgekey_tpm_keygen_timeout_ms();
  tpm->esys = esys;
  tpm->pid = getpid();
  tpm->generation = 1;
  tpm->srk = ESYS_TR_NONE;
  tpm->direct = tcti_is_direct(name);
  if (tpm->direct) {
    /* Without a resource manager, objects of a process that died stay loaded and fill the
     * (three, on swtpm) slots for everyone after it. Nobody else may use a direct TCTI at
     * the same time, so anything loaded now is a leak. */
    int flushed = 0;
    edgekey_tpm_flush_all_transients_locked(tpm, esys, &flushed);
    atomic_init(&tpm->leaked_flushed, flushed);
  }
  registry_add(tpm);
  *out = tpm;
  return TSS2_RC_SUCCESS;
}

TSS2_RC edgekey_tpm_open(const char *tcti, edgekey_tpm **out, char *why, size_t why_len) {
  const char *candidates[4];
  int n = edgekey_tcti_candidates(tcti, candidates);
  if (why != NULL && why_len > 0) why[0] = '\0';
  if (out == NULL) return EDGEKEY_RC_BAD_ARGUMENT;
  append_why(why, why_len, "no TPM answered; tried");
  TSS2_RC last = EDGEKEY_RC_NO_TPM;
  for (int i = 0; i < n; i++) {
    char reason[256];
    TSS2_RC rc = edgekey_tpm_open_exact(candidates[i], out, reason, sizeof(reason));
    if (rc == TSS2_RC_SUCCESS) {
      if (why != NULL && why_len > 0) why[0] = '\0';
      return rc;
    }
    append_why(why, why_len, "%s %s: %s", i == 0 ? "" : ";", candidates[i], reason);
    last = rc;
  }
  return (last & TSS2_RC_LAYER_MASK) == TSS2_TPM_RC_LAYER ? last : EDGEKEY_RC_NO_TPM;
}

edgekey_tpm *edgekey_tpm_ref(edgekey_tpm *tpm) {
  atomic_fetch_add(&tpm->refs, 1);
  return tpm;
}

void edgekey_tpm_unref(edgekey_tpm *tpm) {
  if (tpm == NULL || atomic_fetch_sub(&tpm->refs, 1) != 1) return;
  registry_remove(tpm);
  if (tpm->esys != NULL && tpm->pid == getpid() && tpm->srk != ESYS_TR_NONE)
    Esys_TR_Close(tpm->esys, &tpm->srk);
  esys_stack st = {tpm->guard, tpm->esys};
  close_esys(&st);
  pthread_mutex_destroy(&tpm->lock);
  edgekey_tcti_stats_unref(tpm->stats);
  free(tpm->tcti);
  free(tpm);
}

const char *edgekey_tpm_tcti(const edgekey_tpm *tpm) { return tpm->tcti; }
int edgekey_tpm_is_direct(const edgekey_tpm *tpm) { return tpm->direct; }
int edgekey_tpm_leaked_flushed(const edgekey_tpm *tpm) {
  return atomic_load(&((edgekey_tpm *)tpm)->leaked_flushed);
}
int edgekey_tpm_stuck_commands(const edgekey_tpm *tpm) {
  return edgekey_tcti_stats_stuck(tpm->stats);
}
uint64_t edgekey_tpm_command_count(const edgekey_tpm *tpm) {
  return atomic_load(&((edgekey_tpm *)tpm)->commands);
}

static void discard_locked(edgekey_tpm *tpm) {
  esys_stack st = {tpm->guard, tpm->esys};
  close_esys(&st);
  tpm->guard = NULL;
  tpm->esys = NULL; /* the next acquire opens a new stack and bumps the generation */
  tpm->flush_on_reopen = tpm->direct;
}

ESYS_CONTEXT *edgekey_tpm_acquire(edgekey_tpm *tpm, TSS2_RC *rc) {
  pthread_mutex_lock(&tpm->lock);
  if (rc != NULL) *rc = TSS2_RC_SUCCESS;
  if (tpm->pid != getpid() || tpm->esys == NULL) {
    /* After fork() the parent's ESAPI state (sessions, TCTI socket) is not ours: start over.
     * The parent's objects stay loaded for the parent; ours are loaded again on use. */
    int forked = tpm->pid != getpid();
    esys_stack st = {tpm->guard, tpm->esys};
    close_esys(&st);
    tpm->pid = getpid();
    tpm->generation++;
    tpm->srk = ESYS_TR_NONE;
    tpm->loaded = NULL;
    TSS2_RC r = open_esys(tpm->tcti, &st, &tpm->commands, tpm->stats, tpm->timeout_ms,
                          tpm->long_timeout_ms);
    tpm->guard = st.guard;
    tpm->esys = st.esys;
    if (r == TSS2_RC_SUCCESS && tpm->flush_on_reopen && !forked) {
      /* A discarded context's objects are still loaded in a TPM without a resource manager
       * (unless it was reset): nobody else may use such a TPM, so they are ours, leaked. */
      int flushed = 0;
      r = edgekey_tpm_flush_all_transients_locked(tpm, tpm->esys, &flushed);
      if (r == TSS2_RC_SUCCESS)
        tpm->flush_on_reopen = 0;
      else if (edgekey_rc_breaks_context(r) || edgekey_tcti_guard_broken(tpm->guard))
        discard_locked(tpm);
      else
        r = TSS2_RC_SUCCESS; /* the TPM answered: carry on, slots are recovered on demand */
    }
    if (r != TSS2_RC_SUCCESS) {
      if (rc != NULL) *rc = r;
      pthread_mutex_unlock(&tpm->lock);
      return NULL;
    }
  }
  return tpm->esys;
}

void edgekey_tpm_release(edgekey_tpm *tpm) { edgekey_tpm_release_after(tpm, TSS2_RC_SUCCESS); }

void edgekey_tpm_set_timeouts(edgekey_tpm *tpm, int32_t timeout_ms, int32_t keygen_timeout_ms) {
  if (tpm == NULL || timeout_ms <= 0 || keygen_timeout_ms <= 0) return;
  pthread_mutex_lock(&tpm->lock);
  tpm->timeout_ms = timeout_ms;
  tpm->long_timeout_ms = keygen_timeout_ms;
  if (tpm->pid == getpid()) edgekey_tcti_guard_set_timeouts(tpm->guard, timeout_ms, keygen_timeout_ms);
  pthread_mutex_unlock(&tpm->lock);
}

void edgekey_tpm_get_timeouts(edgekey_tpm *tpm, int32_t *timeout_ms, int32_t *keygen_timeout_ms) {
  pthread_mutex_lock(&tpm->lock);
  if (timeout_ms != NULL) *timeout_ms = tpm->timeout_ms;
  if (keygen_timeout_ms != NULL) *keygen_timeout_ms = tpm->long_timeout_ms;
  pthread_mutex_unlock(&tpm->lock);
}

int edgekey_rc_breaks_context(TSS2_RC rc) {
  TSS2_RC layer = rc & TSS2_RC_LAYER_MASK;
  if (layer == TSS2_TCTI_RC_LAYER || rc == EDGEKEY_RC_TPM_TIMEOUT) return 1;
  if (layer != TSS2_ESAPI_RC_LAYER && layer != TSS2_SYS_RC_LAYER) return 0;
  TSS2_RC base = rc & 0xFFFF;
  return base == TSS2_BASE_RC_BAD_SEQUENCE || base == TSS2_BASE_RC_IO_ERROR ||
         base == TSS2_BASE_RC_NO_CONNECTION || base == TSS2_BASE_RC_MALFORMED_RESPONSE ||
         base == TSS2_BASE_RC_INSUFFICIENT_RESPONSE || base == TSS2_BASE_RC_TRY_AGAIN;
}

void edgekey_tpm_release_after(edgekey_tpm *tpm, TSS2_RC rc) {
  /* The guard knows of a timeout even when the caller ignored the code (a best-effort flush). */
  if ((edgekey_rc_breaks_context(rc) || edgekey_tcti_guard_broken(tpm->guard)) &&
      tpm->pid == getpid() && tpm->esys != NULL)
    discard_locked(tpm);
  pthread_mutex_unlock(&tpm->lock);
}

void edgekey_srk_template(TPM2B_PUBLIC *out) {
  memset(out, 0, sizeof(*out));
  TPMT_PUBLIC *p = &out->publicArea;
  p->type = TPM2_ALG_ECC;
  p->nameAlg = TPM2_ALG_SHA256;
  p->objectAttributes = TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT |
                        TPMA_OBJECT_SENSITIVEDATAORIGIN | TPMA_OBJECT_USERWITHAUTH |
                        TPMA_OBJECT_NODA | TPMA_OBJECT_RESTRICTED | TPMA_OBJECT_DECRYPT;
  p->parameters.eccDetail.symmetric.algorithm = TPM2_ALG_AES;
  p->parameters.eccDetail.symmetric.keyBits.aes = 128;
  p->parameters.eccDetail.symmetric.mode.aes = TPM2_ALG_CFB;
  p->parameters.eccDetail.scheme.scheme = TPM2_ALG_NULL;
  p->parameters.eccDetail.curveID = TPM2_ECC_NIST_P256;
  p->parameters.eccDetail.kdf.scheme = TPM2_ALG_NULL;
  /* unique stays empty: the SRK tpm2-openssl and tpm2-tss-engine re-create for 0x40000001. */
}

/* Equal to the standard template in everything but the unique field (the public key). */
static int srk_matches_template(const TPMT_PUBLIC *p) {
  TPM2B_PUBLIC t;
  edgekey_srk_template(&t);
  const TPMT_PUBLIC *e = &t.publicArea;
  return p->type == e->type && p->nameAlg == e->nameAlg &&
         p->objectAttributes == e->objectAttributes && p->authPolicy.size == 0 &&
         p->parameters.eccDetail.symmetric.algorithm == TPM2_ALG_AES &&
         p->parameters.eccDetail.symmetric.keyBits.aes == 128 &&
         p->parameters.eccDetail.symmetric.mode.aes == TPM2_ALG_CFB &&
         p->parameters.eccDetail.scheme.scheme == TPM2_ALG_NULL &&
         p->parameters.eccDetail.curveID == TPM2_ECC_NIST_P256 &&
         p->parameters.eccDetail.kdf.scheme == TPM2_ALG_NULL;
}

static TSS2_RC create_primary_srk(ESYS_CONTEXT *esys, ESYS_TR *srk) {
  TPM2B_PUBLIC template;
  edgekey_srk_template(&template);
  TPM2B_SENSITIVE_CREATE sensitive = {0};
  TPM2B_DATA outside = {0};
  TPML_PCR_SELECTION pcrs = {0};
  TPM2B_PUBLIC *pub = NULL;
  TPM2B_CREATION_DATA *creation = NULL;
  TPM2B_DIGEST *hash = NULL;
  TPMT_TK_CREATION *ticket = NULL;
  TSS2_RC rc = Esys_CreatePrimary(esys, ESYS_TR_RH_OWNER, ESYS_TR_PASSWORD, ESYS_TR_NONE,
                                  ESYS_TR_NONE, &sensitive, &template, &outside, &pcrs, srk, &pub,
                                  &creation, &hash, &ticket);
  Esys_Free(pub);
  Esys_Free(creation);
  Esys_Free(hash);
  Esys_Free(ticket);
  return rc;
}

TSS2_RC edgekey_tpm_srk_locked(edgekey_tpm *tpm, ESYS_CONTEXT *esys, ESYS_TR *srk,
                               int *is_transient, const char **cmd) {
  *is_transient = 0;
  if (tpm->srk != ESYS_TR_NONE && tpm->srk_generation == tpm->generation) {
    *srk = tpm->srk;
    return TSS2_RC_SUCCESS;
  }
  ESYS_TR persistent = ESYS_TR_NONE;
  /* Ask whether the handle exists first: ESAPI logs an error for a missing handle. */
  TPMS_CAPABILITY_DATA *cap = NULL;
  TPMI_YES_NO more = TPM2_NO;
  TSS2_RC rc = Esys_GetCapability(esys, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                                  TPM2_CAP_HANDLES, EDGEKEY_SRK_HANDLE, 1, &more, &cap);
  int present = rc == TSS2_RC_SUCCESS && cap->data.handles.count > 0 &&
                cap->data.handles.handle[0] == EDGEKEY_SRK_HANDLE;
  Esys_Free(cap);
  if (rc != TSS2_RC_SUCCESS) {
    if (cmd != NULL) *cmd = "TPM2_GetCapability";
    return rc;
  }
  if (present)
    rc = Esys_TR_FromTPMPublic(esys, EDGEKEY_SRK_HANDLE, ESYS_TR_NONE, ESYS_TR_NONE,
                               ESYS_TR_NONE, &persistent);
  if (present && rc == TSS2_RC_SUCCESS) {
    TPM2B_PUBLIC *pub = NULL;
    rc = Esys_ReadPublic(esys, persistent, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &pub, NULL,
                         NULL);
    int matches = rc == TSS2_RC_SUCCESS && srk_matches_template(&pub->publicArea);
    Esys_Free(pub);
    if (matches) {
      tpm->srk = persistent;
      tpm->srk_generation = tpm->generation;
      *srk = persistent;
      return TSS2_RC_SUCCESS;
    }
    /* Some other key sits at 0x81000001: TSS2 PRIVATE KEY readers would ignore it and
     * re-create the standard SRK, so must we. */
    Esys_TR_Close(esys, &persistent);
  }
  for (int attempt = 0; attempt < 4; attempt++) {
    rc = create_primary_srk(esys, srk);
    if (edgekey_rc_base(rc) != TPM2_RC_OBJECT_MEMORY) break;
    if (!edgekey_tpm_make_room_locked(tpm, esys, NULL, ESYS_TR_NONE)) break;
  }
  if (rc != TSS2_RC_SUCCESS) {
    if (cmd != NULL) *cmd = "TPM2_CreatePrimary";
    return rc;
  }
  *is_transient = 1;
  return TSS2_RC_SUCCESS;
}
