/* Internal to the C core: the layout of the shared context and of a key. */
#ifndef EDGEKEY_INTERNAL_H
#define EDGEKEY_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <sys/types.h>

#include "edgekey.h"

struct edgekey_tpm {
  pthread_mutex_t lock;
  atomic_int refs;
  char *tcti;
  TSS2_TCTI_CONTEXT *tcti_ctx;
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
};

struct edgekey_tpm_key {
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
/* Flushes the least recently used loaded key other than `keep`; 0 when there was none. */
int edgekey_tpm_evict_lru_locked(edgekey_tpm *tpm, ESYS_CONTEXT *esys, edgekey_tpm_key *keep);

#endif
