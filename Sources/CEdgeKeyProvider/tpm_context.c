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

static void install_atfork(void) { pthread_atfork(atfork_prepare, atfork_parent, atfork_child); }

static void registry_add(edgekey_tpm *tpm) {
  pthread_once(&atfork_once, install_atfork);
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

static int tcti_is_direct(const char *tcti) {
  if (strncmp(tcti, "swtpm", 5) == 0 || strncmp(tcti, "mssim", 5) == 0) return 1;
  if (strncmp(tcti, "device", 6) == 0) {
    const char *path = strchr(tcti, ':');
    /* tctildr's "device" without a path means /dev/tpm0: the raw chip. */
    return path == NULL || strstr(path, "tpmrm") == NULL;
  }
  return 0;
}

int32_t edgekey_tpm_timeout_ms(void) {
  const char *env = getenv("EDGEKEY_TPM_TIMEOUT_MS");
  long v = env != NULL ? strtol(env, NULL, 10) : 0;
  return v > 0 && v < INT32_MAX ? (int32_t)v : EDGEKEY_DEFAULT_TPM_TIMEOUT_MS;
}

/* The TCTI (tctildr), the counting TCTI in front of it, and the ESAPI context on top. */
typedef struct {
  TSS2_TCTI_CONTEXT *tcti;
  TSS2_TCTI_CONTEXT *counting;
  ESYS_CONTEXT *esys;
} esys_stack;

/* Opens the stack; the caller decides what a failure means. */
static TSS2_RC open_esys(const char *tcti, esys_stack *st, atomic_uint_fast64_t *counter) {
  st->tcti = NULL;
  st->counting = NULL;
  st->esys = NULL;
  TSS2_RC rc = Tss2_TctiLdr_Initialize(tcti, &st->tcti);
  if (rc != TSS2_RC_SUCCESS) return rc;
  rc = edgekey_tcti_counting_wrap(st->tcti, &st->counting, counter);
  if (rc == TSS2_RC_SUCCESS) rc = Esys_Initialize(&st->esys, st->counting, NULL);
  if (rc == TSS2_RC_SUCCESS) Esys_SetTimeout(st->esys, edgekey_tpm_timeout_ms());
  if (rc != TSS2_RC_SUCCESS) {
    edgekey_tcti_counting_free(st->counting);
    st->counting = NULL;
    Tss2_TctiLdr_Finalize(&st->tcti);
  }
  return rc;
}

static void close_esys(esys_stack *st) {
  if (st->esys != NULL) Esys_Finalize(&st->esys);
  edgekey_tcti_counting_free(st->counting);
  st->counting = NULL;
  if (st->tcti != NULL) Tss2_TctiLdr_Finalize(&st->tcti);
}

/* One candidate: open and start up. The TPM answering with any TPM-layer code counts as up. */
static TSS2_RC try_candidate(const char *tcti, esys_stack *st, atomic_uint_fast64_t *counter,
                             const char **stage) {
  *stage = "opening the TCTI";
  TSS2_RC rc = open_esys(tcti, st, counter);
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
  TPMS_CAPABILITY_DATA *cap = NULL;
  TPMI_YES_NO more = TPM2_NO;
  *flushed = 0;
  TSS2_RC rc = Esys_GetCapability(esys, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, TPM2_CAP_HANDLES,
                                  TPM2_TRANSIENT_FIRST, TPM2_MAX_CAP_HANDLES, &more, &cap);
  if (rc != TSS2_RC_SUCCESS) goto out;
  for (UINT32 i = 0; i < cap->data.handles.count; i++) {
    ESYS_TR object = ESYS_TR_NONE;
    TPM2_HANDLE handle = cap->data.handles.handle[i];
    if (Esys_TR_FromTPMPublic(esys, handle, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &object) !=
        TSS2_RC_SUCCESS)
      continue;
    if (Esys_FlushContext(esys, object) == TSS2_RC_SUCCESS)
      (*flushed)++;
    else
      Esys_TR_Close(esys, &object);
  }
  /* Our own loaded keys, if any, were among them. */
  for (edgekey_tpm_key *k = tpm->loaded; k != NULL;) {
    edgekey_tpm_key *next = k->next_loaded;
    k->handle = ESYS_TR_NONE;
    k->next_loaded = NULL;
    k = next;
  }
  tpm->loaded = NULL;
out:
  Esys_Free(cap);
  return rc;
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
  if (why != NULL && why_len > 0) why[0] = '\0';
  if (out == NULL || tcti == NULL) return EDGEKEY_RC_BAD_ARGUMENT;
  *out = NULL;
  edgekey_tpm *tpm = calloc(1, sizeof(*tpm));
  char *name = strdup(tcti);
  if (tpm == NULL || name == NULL) {
    free(tpm);
    free(name);
    return EDGEKEY_RC_MEMORY;
  }
  atomic_init(&tpm->commands, 0);
  esys_stack st;
  const char *stage = "";
  TSS2_RC rc = try_candidate(tcti, &st, &tpm->commands, &stage);
  if (rc != TSS2_RC_SUCCESS) {
    append_why(why, why_len, "%s failed: %s", stage, Tss2_RC_Decode(rc));
    free(tpm);
    free(name);
    return rc;
  }
  ESYS_CONTEXT *esys = st.esys;
  pthread_mutex_init(&tpm->lock, NULL);
  atomic_init(&tpm->refs, 1);
  tpm->tcti = name;
  tpm->tcti_ctx = st.tcti;
  tpm->counting = st.counting;
  tpm->esys = esys;
  tpm->pid = getpid();
  tpm->generation = 1;
  tpm->srk = ESYS_TR_NONE;
  tpm->direct = tcti_is_direct(name);
  if (tpm->direct) {
    /* Without a resource manager, objects of a process that died stay loaded and fill the
     * (three, on swtpm) slots for everyone after it. Nobody else may use a direct TCTI at
     * the same time, so anything loaded now is a leak. */
    edgekey_tpm_flush_all_transients_locked(tpm, esys, &tpm->leaked_flushed);
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
  esys_stack st = {tpm->tcti_ctx, tpm->counting, tpm->esys};
  close_esys(&st);
  pthread_mutex_destroy(&tpm->lock);
  free(tpm->tcti);
  free(tpm);
}

const char *edgekey_tpm_tcti(const edgekey_tpm *tpm) { return tpm->tcti; }
int edgekey_tpm_is_direct(const edgekey_tpm *tpm) { return tpm->direct; }
int edgekey_tpm_leaked_flushed(const edgekey_tpm *tpm) { return tpm->leaked_flushed; }
uint64_t edgekey_tpm_command_count(const edgekey_tpm *tpm) {
  return atomic_load(&((edgekey_tpm *)tpm)->commands);
}

ESYS_CONTEXT *edgekey_tpm_acquire(edgekey_tpm *tpm, TSS2_RC *rc) {
  pthread_mutex_lock(&tpm->lock);
  if (rc != NULL) *rc = TSS2_RC_SUCCESS;
  if (tpm->pid != getpid() || tpm->esys == NULL) {
    /* After fork() the parent's ESAPI state (sessions, TCTI socket) is not ours: start over.
     * The parent's objects stay loaded for the parent; ours are loaded again on use. */
    esys_stack st = {tpm->tcti_ctx, tpm->counting, tpm->esys};
    close_esys(&st);
    tpm->pid = getpid();
    tpm->generation++;
    tpm->srk = ESYS_TR_NONE;
    tpm->loaded = NULL;
    TSS2_RC r = open_esys(tpm->tcti, &st, &tpm->commands);
    tpm->tcti_ctx = st.tcti;
    tpm->counting = st.counting;
    tpm->esys = st.esys;
    if (r != TSS2_RC_SUCCESS) {
      if (rc != NULL) *rc = r;
      pthread_mutex_unlock(&tpm->lock);
      return NULL;
    }
  }
  return tpm->esys;
}

void edgekey_tpm_release(edgekey_tpm *tpm) { pthread_mutex_unlock(&tpm->lock); }

int edgekey_rc_breaks_context(TSS2_RC rc) {
  TSS2_RC layer = rc & TSS2_RC_LAYER_MASK;
  if (layer == TSS2_TCTI_RC_LAYER) return 1;
  if (layer != TSS2_ESAPI_RC_LAYER && layer != TSS2_SYS_RC_LAYER) return 0;
  TSS2_RC base = rc & 0xFFFF;
  return base == TSS2_BASE_RC_BAD_SEQUENCE || base == TSS2_BASE_RC_IO_ERROR ||
         base == TSS2_BASE_RC_NO_CONNECTION || base == TSS2_BASE_RC_MALFORMED_RESPONSE ||
         base == TSS2_BASE_RC_INSUFFICIENT_RESPONSE || base == TSS2_BASE_RC_TRY_AGAIN;
}

void edgekey_tpm_release_after(edgekey_tpm *tpm, TSS2_RC rc) {
  if (edgekey_rc_breaks_context(rc) && tpm->pid == getpid()) {
    esys_stack st = {tpm->tcti_ctx, tpm->counting, tpm->esys};
    close_esys(&st);
    tpm->tcti_ctx = NULL;
    tpm->counting = NULL;
    tpm->esys = NULL; /* the next acquire opens a new stack and bumps the generation */
  }
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
    if (!edgekey_tpm_evict_lru_locked(tpm, esys, NULL)) break;
  }
  if (rc != TSS2_RC_SUCCESS) {
    if (cmd != NULL) *cmd = "TPM2_CreatePrimary";
    return rc;
  }
  *is_transient = 1;
  return TSS2_RC_SUCCESS;
}
