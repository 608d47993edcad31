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
  TSS2_TCTI_CONTEXT *tcti_ctx; /* the real TCTI, from tctildr */
  TSS2_TCTI_CONTEXT *counting; /* the counting TCTI in front of it, which ESAPI uses */
  atomic_uint_fast64_t commands;
  ESYS_CONTEXT *esys;
  pid_t pid;
  /* Bumped whenever ESYS_TR values become meaningless (context re-created after fork). */
  uint64_t generation;
  int direct;
  int leaked_flushed;
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
/* Number of TPM commands sent through the context's TCTI (tcti_count.c). */
TSS2_RC edgekey_tcti_counting_wrap(TSS2_TCTI_CONTEXT *inner, TSS2_TCTI_CONTEXT **out,
                                   atomic_uint_fast64_t *counter);
void edgekey_tcti_counting_free(TSS2_TCTI_CONTEXT *wrapper);

/* Flushes the least recently used loaded key other than `keep`; 0 when there was none. */
int edgekey_tpm_evict_lru_locked(edgekey_tpm *tpm, ESYS_CONTEXT *esys, edgekey_tpm_key *keep);

/* `why` (for callers that explain a refusal): a printf-formatted reason, and OpenSSL's last
 * queued error appended to it (the TLS context builders use both). */
void edgekey_set_why(char *why, size_t why_len, const char *fmt, ...);
void edgekey_append_openssl_error(char *why, size_t why_len);

/* The provider's last error on this thread ("" when none since the last clear): TLS failure
 * diagnosis reads it when the OpenSSL error queue has been drained by the time it looks. */
const char *edgekey_provider_thread_error(void);
void edgekey_provider_thread_error_clear(void);

#endif
