/* Internal to the C core: the layout of the shared context and of a key. */
#ifndef EDGEKEY_INTERNAL_H
#define EDGEKEY_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <sys/types.h>

#include <openssl/evp.h>

#include "edgekey.h"

struct edgekey_tpm {
  pthread_mutex_t lock;
  atomic_int refs;
  char *tcti;
  /* The guard TCTI (tcti_guard.c) ESAPI talks to; it owns the real TCTI from tctildr. */
  TSS2_TCTI_CONTEXT *guard;
  atomic_uint_fast64_t commands;
  edgekey_tcti_stats *stats;
  int32_t timeout_ms;      /* per command */
  int32_t long_timeout_ms; /* per key generation command */
  /* A context was discarded after a transport failure or timeout: over a direct TCTI, the
   * objects it had loaded are still in the TPM and are flushed by the next acquire. */
  int flush_on_reopen;
  ESYS_CONTEXT *esys;
  pid_t pid;
  /* Bumped whenever ESYS_TR values become meaningless (context re-created after fork). */
  uint64_t generation;
  int direct;
  atomic_int leaked_flushed;
  /* The persistent SRK's ESYS_TR, cached for this generation (ESYS_TR_NONE when unknown). */
  ESYS_TR srk;
  uint64_t srk_generation;
  /* Keys of ours currently loaded as transient objects, for eviction when slots run out. */
  edgekey_tpm_key *loaded;
  uint64_t use_clock;
  /* In the list of open contexts that the fork handlers lock (tpm_context.c). */
  edgekey_tpm *next_open;
  int fork_locked;
};

#define EDGEKEY_KEY_MAGIC 0x45444b59u /* "EDKY": checked where a key arrives as a raw pointer */

struct edgekey_tpm_key {
  uint32_t magic;
  atomic_int refs;
  /* Set once the key's RSA-PSS signatures were checked to use salt = digest length. */
  atomic_int pss_checked;
  edgekey_tpm *tpm;
  uint32_t parent;     /* EDGEKEY_PARENT_OWNER, a persistent parent, or 0 for a persistent key */
  uint32_t persistent; /* the key's own persistent handle, or 0 */
  TPM2B_PUBLIC public_area;
  TPM2B_PRIVATE private_area;
  TPM2B_AUTH auth;
  ESYS_TR handle; /* ESYS_TR_NONE while not loaded */
  uint64_t generation;
  uint64_t last_use;
  uint64_t loads;
  edgekey_tpm_key *next_loaded; /* in tpm->loaded, when loaded and transient */
};

/* Response codes that mean "the object you named is not in the TPM (any more)". */
int edgekey_rc_is_missing_object(TSS2_RC rc);
/* Strips the parameter/handle/session number from a format-one TPM response code. */
TSS2_RC edgekey_rc_base(TSS2_RC rc);
/* The public area as a software EVP_PKEY of the default provider (NULL if unsupported). */
EVP_PKEY *edgekey_public_to_evp(const TPM2B_PUBLIC *pub);
/*
 * The guard TCTI (tcti_guard.c): opens `conf` through tctildr, counts every command into
 * `counter` and bounds each one (`timeout_ms`, `long_timeout_ms` for key generation), ending
 * an overdue one in EDGEKEY_RC_TPM_TIMEOUT; opening is bounded by `timeout_ms` too. Freed with
 * edgekey_tcti_guard_free, after Esys_Finalize of the context using it.
 */
TSS2_RC edgekey_tcti_guard_open(const char *conf, atomic_uint_fast64_t *counter,
                                edgekey_tcti_stats *stats, int32_t timeout_ms,
                                int32_t long_timeout_ms, TSS2_TCTI_CONTEXT **out);
/* What a context's guards share: how many of their abandoned commands are still stuck. */
edgekey_tcti_stats *edgekey_tcti_stats_new(void);
void edgekey_tcti_stats_unref(edgekey_tcti_stats *stats);
int edgekey_tcti_stats_stuck(const edgekey_tcti_stats *stats);
void edgekey_tcti_guard_set_timeouts(TSS2_TCTI_CONTEXT *guard, int32_t timeout_ms,
                                     int32_t long_timeout_ms);
/* 1 once a command through `guard` timed out: the ESAPI context on it must be discarded. */
int edgekey_tcti_guard_broken(TSS2_TCTI_CONTEXT *guard);
void edgekey_tcti_guard_free(TSS2_TCTI_CONTEXT *guard);

/* Flushes the least recently used loaded key other than `keep`; 0 when there was none. */
int edgekey_tpm_evict_lru_locked(edgekey_tpm *tpm, ESYS_CONTEXT *esys, edgekey_tpm_key *keep);
/* Flushes every loaded key of ours (their next use loads them again). */
void edgekey_tpm_unload_all_locked(edgekey_tpm *tpm, ESYS_CONTEXT *esys);
/* Flushes every transient object that is neither a loaded key of ours nor `keep`. */
TSS2_RC edgekey_tpm_flush_foreign_locked(edgekey_tpm *tpm, ESYS_CONTEXT *esys, ESYS_TR keep,
                                         int *flushed);
/* Makes room for one object when the TPM's slots are full: evicts our least recently used key
 * but `keep`; when there is none and the TCTI is direct, flushes leaked objects (all but ours
 * and `keep_parent`). Returns 1 when something was flushed. */
int edgekey_tpm_make_room_locked(edgekey_tpm *tpm, ESYS_CONTEXT *esys, edgekey_tpm_key *keep,
                                 ESYS_TR keep_parent);

/* `why` (for callers that explain a refusal): a printf-formatted reason, and OpenSSL's last
 * queued error appended to it (the TLS context builders use both). */
void edgekey_set_why(char *why, size_t why_len, const char *fmt, ...);
void edgekey_append_openssl_error(char *why, size_t why_len);

/* The provider's last error on this thread ("" when none since the last clear): TLS failure
 * diagnosis reads it when the OpenSSL error queue has been drained by the time it looks. */
const char *edgekey_provider_thread_error(void);
void edgekey_provider_thread_error_clear(void);

#endif
