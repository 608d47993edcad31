/* A TPM-held key: loaded once, kept loaded, signing with exactly one TPM2_Sign. */
#include <stdlib.h>
#include <string.h>

#include <tss2/tss2_mu.h>

#include "internal.h"

static int auth_ok(const uint8_t *auth, size_t auth_len) {
  return auth_len <= sizeof(((TPM2B_AUTH *)0)->buffer) && (auth != NULL || auth_len == 0);
}

static edgekey_tpm_key *key_new(edgekey_tpm *tpm, const uint8_t *auth, size_t auth_len) {
  edgekey_tpm_key *key = calloc(1, sizeof(*key));
  if (key == NULL) return NULL;
  key->magic = EDGEKEY_KEY_MAGIC;
  atomic_init(&key->refs, 1);
  atomic_init(&key->pss_checked, 0);
  key->tpm = edgekey_tpm_ref(tpm);
  key->handle = ESYS_TR_NONE;
  key->auth.size = (UINT16)auth_len;
  if (auth_len > 0) memcpy(key->auth.buffer, auth, auth_len);
  return key;
}

static int is_signing_key(const TPMT_PUBLIC *p) {
  return (p->type == TPM2_ALG_ECC || p->type == TPM2_ALG_RSA) &&
         (p->objectAttributes & TPMA_OBJECT_SIGN_ENCRYPT) &&
         !(p->objectAttributes & TPMA_OBJECT_RESTRICTED);
}

/* A restricted signing key: an attestation key (signs only what the TPM itself produced). */
static int is_attestation_key(const TPMT_PUBLIC *p) {
  return (p->type == TPM2_ALG_ECC || p->type == TPM2_ALG_RSA) &&
         (p->objectAttributes & TPMA_OBJECT_SIGN_ENCRYPT) &&
         (p->objectAttributes & TPMA_OBJECT_RESTRICTED) &&
         !(p->objectAttributes & TPMA_OBJECT_DECRYPT);
}

static TSS2_RC from_blobs(edgekey_tpm *tpm, uint32_t parent, const uint8_t *pub, size_t pub_len,
                          const uint8_t *priv, size_t priv_len, const uint8_t *auth,
                          size_t auth_len, int attestation, edgekey_tpm_key **out);

TSS2_RC edgekey_tpm_key_from_blobs(edgekey_tpm *tpm, uint32_t parent, const uint8_t *pub,
                                   size_t pub_len, const uint8_t *priv, size_t priv_len,
                                   const uint8_t *auth, size_t auth_len, edgekey_tpm_key **out) {
  return from_blobs(tpm, parent, pub, pub_len, priv, priv_len, auth, auth_len, 0, out);
}

TSS2_RC edgekey_tpm_attestation_key_from_blobs(edgekey_tpm *tpm, uint32_t parent,
                                               const uint8_t *pub, size_t pub_len,
                                               const uint8_t *priv, size_t priv_len,
                                               edgekey_tpm_key **out) {
  return from_blobs(tpm, parent, pub, pub_len, priv, priv_len, NULL, 0, 1, out);
}

static TSS2_RC from_blobs(edgekey_tpm *tpm, uint32_t parent, const uint8_t *pub, size_t pub_len,
                          const uint8_t *priv, size_t priv_len, const uint8_t *auth,
                          size_t auth_len, int attestation, edgekey_tpm_key **out) {
  if (tpm == NULL || out == NULL || pub == NULL || priv == NULL || !auth_ok(auth, auth_len))
    return EDGEKEY_RC_BAD_ARGUMENT;
  *out = NULL;
  edgekey_tpm_key *key = key_new(tpm, auth, auth_len);
  if (key == NULL) return EDGEKEY_RC_MEMORY;
  size_t offset = 0;
  TSS2_RC rc = Tss2_MU_TPM2B_PUBLIC_Unmarshal(pub, pub_len, &offset, &key->public_area);
  if (rc != TSS2_RC_SUCCESS || offset != pub_len) goto bad;
  offset = 0;
  rc = Tss2_MU_TPM2B_PRIVATE_Unmarshal(priv, priv_len, &offset, &key->private_area);
  if (rc != TSS2_RC_SUCCESS || offset != priv_len) goto bad;
  if (attestation ? !is_attestation_key(&key->public_area.publicArea)
                  : !is_signing_key(&key->public_area.publicArea)) {
    edgekey_tpm_key_free(key);
    return EDGEKEY_RC_NOT_A_SIGNING_KEY;
  }
  key->parent = parent;
  *out = key;
  return TSS2_RC_SUCCESS;
bad:
  edgekey_tpm_key_free(key);
  return EDGEKEY_RC_BAD_KEYFILE;
}

TSS2_RC edgekey_tpm_key_from_persistent(edgekey_tpm *tpm, uint32_t handle, const uint8_t *auth,
                                        size_t auth_len, edgekey_tpm_key **out,
                                        const char **cmd) {
  if (tpm == NULL || out == NULL || !auth_ok(auth, auth_len) ||
      (handle >> TPM2_HR_SHIFT) != TPM2_HT_PERSISTENT)
    return EDGEKEY_RC_BAD_ARGUMENT;
  *out = NULL;
  edgekey_tpm_key *key = key_new(tpm, auth, auth_len);
  if (key == NULL) return EDGEKEY_RC_MEMORY;
  key->persistent = handle;
  TSS2_RC rc;
  ESYS_CONTEXT *esys = edgekey_tpm_acquire(tpm, &rc);
  if (esys == NULL) goto fail;
  TPM2B_PUBLIC *pub = NULL;
  rc = Esys_TR_FromTPMPublic(esys, handle, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                             &key->handle);
  if (rc == TSS2_RC_SUCCESS) {
    rc = Esys_ReadPublic(esys, key->handle, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &pub, NULL,
                         NULL);
  }
  if (rc == TSS2_RC_SUCCESS) {
    key->public_area = *pub;
    key->generation = tpm->generation;
    Esys_TR_SetAuth(esys, key->handle, &key->auth);
  } else if (key->handle != ESYS_TR_NONE) {
    Esys_TR_Close(esys, &key->handle);
  }
  Esys_Free(pub);
  edgekey_tpm_release_after(tpm, rc);
  if (rc != TSS2_RC_SUCCESS) goto fail;
  if (!is_signing_key(&key->public_area.publicArea)) {
    edgekey_tpm_key_free(key);
    return EDGEKEY_RC_NOT_A_SIGNING_KEY;
  }
  *out = key;
  return TSS2_RC_SUCCESS;
fail:
  if (cmd != NULL) *cmd = "TPM2_ReadPublic";
  edgekey_tpm_key_free(key);
  return rc;
}

const TPM2B_PUBLIC *edgekey_tpm_key_public(const edgekey_tpm_key *key) {
  return &key->public_area;
}

uint64_t edgekey_tpm_key_load_count(const edgekey_tpm_key *key) { return key->loads; }

static void unlink_loaded(edgekey_tpm *tpm, edgekey_tpm_key *key) {
  for (edgekey_tpm_key **p = &tpm->loaded; *p != NULL; p = &(*p)->next_loaded) {
    if (*p == key) {
      *p = key->next_loaded;
      key->next_loaded = NULL;
      return;
    }
  }
}

/* Forgets the key's handle; flushes it too when it is a transient object of this context. */
static void unload_locked(edgekey_tpm_key *key, ESYS_CONTEXT *esys, int flush) {
  if (key->handle == ESYS_TR_NONE) return;
  if (key->generation == key->tpm->generation) {
    if (flush && key->persistent == 0)
      Esys_FlushContext(esys, key->handle);
    else
      Esys_TR_Close(esys, &key->handle);
    unlink_loaded(key->tpm, key);
  }
  key->handle = ESYS_TR_NONE;
}

void edgekey_tpm_unload_all_locked(edgekey_tpm *tpm, ESYS_CONTEXT *esys) {
  for (edgekey_tpm_key *k = tpm->loaded; k != NULL;) {
    edgekey_tpm_key *next = k->next_loaded;
    if (k->generation == tpm->generation && k->persistent == 0) Esys_FlushContext(esys, k->handle);
    k->handle = ESYS_TR_NONE;
    k->next_loaded = NULL;
    k = next;
  }
  tpm->loaded = NULL;
}

int edgekey_tpm_evict_lru_locked(edgekey_tpm *tpm, ESYS_CONTEXT *esys, edgekey_tpm_key *keep) {
  edgekey_tpm_key *victim = NULL;
  for (edgekey_tpm_key *k = tpm->loaded; k != NULL; k = k->next_loaded) {
    if (k != keep && (victim == NULL || k->last_use < victim->last_use)) victim = k;
  }
  if (victim == NULL) return 0;
  unload_locked(victim, esys, 1);
  return 1;
}

static TSS2_RC load_locked(edgekey_tpm_key *key, ESYS_CONTEXT *esys, const char **cmd) {
  edgekey_tpm *tpm = key->tpm;
  if (key->handle != ESYS_TR_NONE && key->generation == tpm->generation) return TSS2_RC_SUCCESS;
  key->handle = ESYS_TR_NONE;
  TSS2_RC rc;
  if (key->persistent != 0) {
    rc = Esys_TR_FromTPMPublic(esys, key->persistent, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                               &key->handle);
    if (rc != TSS2_RC_SUCCESS) {
      if (cmd != NULL) *cmd = "TPM2_ReadPublic";
      key->handle = ESYS_TR_NONE;
      return rc;
    }
    key->generation = tpm->generation;
    Esys_TR_SetAuth(esys, key->handle, &key->auth);
    return TSS2_RC_SUCCESS;
  }

  ESYS_TR parent = ESYS_TR_NONE;
  int parent_transient = 0;
  if (key->parent == EDGEKEY_PARENT_OWNER) {
    rc = edgekey_tpm_srk_locked(tpm, esys, &parent, &parent_transient, cmd);
  } else {
    rc = Esys_TR_FromTPMPublic(esys, key->parent, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                               &parent);
    if (rc != TSS2_RC_SUCCESS && cmd != NULL) *cmd = "TPM2_ReadPublic";
  }
  if (rc != TSS2_RC_SUCCESS) return rc;

  for (int attempt = 0; attempt < 4; attempt++) {
    rc = Esys_Load(esys, parent, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE, &key->private_area,
                   &key->public_area, &key->handle);
    if (edgekey_rc_base(rc) != TPM2_RC_OBJECT_MEMORY) break;
    /* Slots full: make room by flushing the key of ours used longest ago, or, over a TCTI
     * without a resource manager, objects leaked by processes that exited without flushing. */
    if (!edgekey_tpm_make_room_locked(tpm, esys, key, parent_transient ? parent : ESYS_TR_NONE))
      break;
  }
  if (rc == TSS2_RC_SUCCESS) key->loads++;
  if (parent_transient) {
    Esys_FlushContext(esys, parent);
  } else if (key->parent != EDGEKEY_PARENT_OWNER) {
    Esys_TR_Close(esys, &parent);
  }
  if (rc != TSS2_RC_SUCCESS) {
    if (cmd != NULL) *cmd = "TPM2_Load";
    key->handle = ESYS_TR_NONE;
    /* A persistent SRK that vanished under us is looked up again next time. */
    if (key->parent == EDGEKEY_PARENT_OWNER && !parent_transient) {
      Esys_TR_Close(esys, &tpm->srk);
      tpm->srk = ESYS_TR_NONE;
    }
    return rc;
  }
  key->generation = tpm->generation;
  key->next_loaded = tpm->loaded;
  tpm->loaded = key;
  Esys_TR_SetAuth(esys, key->handle, &key->auth);
  return TSS2_RC_SUCCESS;
}

TSS2_RC edgekey_tpm_key_load(edgekey_tpm_key *key, const char **cmd) {
  TSS2_RC rc;
  ESYS_CONTEXT *esys = edgekey_tpm_acquire(key->tpm, &rc);
  if (esys == NULL) {
    if (cmd != NULL) *cmd = "Esys_Initialize";
    return rc;
  }
  rc = load_locked(key, esys, cmd);
  edgekey_tpm_release_after(key->tpm, rc);
  return rc;
}

void edgekey_tpm_key_unload(edgekey_tpm_key *key) {
  ESYS_CONTEXT *esys = edgekey_tpm_acquire(key->tpm, NULL);
  if (esys != NULL) {
    unload_locked(key, esys, 1);
    edgekey_tpm_release(key->tpm);
  }
}

edgekey_tpm_key *edgekey_tpm_key_ref(edgekey_tpm_key *key) {
  atomic_fetch_add(&key->refs, 1);
  return key;
}

void edgekey_tpm_key_free(edgekey_tpm_key *key) {
  if (key == NULL || atomic_fetch_sub(&key->refs, 1) != 1) return;
  key->magic = 0;
  if (key->handle != ESYS_TR_NONE) edgekey_tpm_key_unload(key);
  edgekey_tpm *tpm = key->tpm;
  memset(&key->auth, 0, sizeof(key->auth));
  free(key);
  edgekey_tpm_unref(tpm);
}

static TSS2_RC sign_locked(edgekey_tpm_key *key, ESYS_CONTEXT *esys, const TPM2B_DIGEST *digest,
                           const TPMT_SIG_SCHEME *scheme, TPMT_SIGNATURE *out) {
  /* A NULL ticket: the key is not restricted, so the TPM needs no proof that it hashed. */
  TPMT_TK_HASHCHECK validation = {
      .tag = TPM2_ST_HASHCHECK, .hierarchy = TPM2_RH_NULL, .digest = {.size = 0}};
  TPMT_SIGNATURE *signature = NULL;
  TSS2_RC rc = Esys_Sign(esys, key->handle, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE, digest,
                         scheme, &validation, &signature);
  if (rc == TSS2_RC_SUCCESS) *out = *signature;
  Esys_Free(signature);
  return rc;
}

TSS2_RC edgekey_tpm_key_sign(edgekey_tpm_key *key, TPMI_ALG_SIG_SCHEME scheme, TPMI_ALG_HASH hash,
                             const uint8_t *digest, size_t digest_len, TPMT_SIGNATURE *out,
                             const char **cmd) {
  if (key == NULL || digest == NULL || out == NULL || digest_len == 0 ||
      digest_len > sizeof(((TPM2B_DIGEST *)0)->buffer))
    return EDGEKEY_RC_BAD_ARGUMENT;
  TPM2B_DIGEST d = {.size = (UINT16)digest_len};
  memcpy(d.buffer, digest, digest_len);
  TPMT_SIG_SCHEME s = {.scheme = scheme};
  s.details.any.hashAlg = hash;

  TSS2_RC rc;
  ESYS_CONTEXT *esys = edgekey_tpm_acquire(key->tpm, &rc);
  if (esys == NULL) {
    if (cmd != NULL) *cmd = "Esys_Initialize";
    return rc;
  }
  key->last_use = ++key->tpm->use_clock;
  rc = load_locked(key, esys, cmd);
  if (rc == TSS2_RC_SUCCESS) {
    rc = sign_locked(key, esys, &d, &s, out);
    if (rc == TPM2_RC_INITIALIZE) {
      /* The TPM was reset and nobody started it (a simulator restarted without startup). */
      Esys_Startup(esys, TPM2_SU_CLEAR);
    }
    if (rc == TPM2_RC_INITIALIZE || edgekey_rc_is_missing_object(rc)) {
      /* The TPM lost our object (reset, or flushed by someone else): load it once more. */
      unload_locked(key, esys, 0);
      rc = load_locked(key, esys, cmd);
      if (rc == TSS2_RC_SUCCESS) {
        rc = sign_locked(key, esys, &d, &s, out);
        if (rc != TSS2_RC_SUCCESS && cmd != NULL) *cmd = "TPM2_Sign";
      }
    } else if (rc != TSS2_RC_SUCCESS && cmd != NULL) {
      *cmd = "TPM2_Sign";
    }
  }
  edgekey_tpm_release_after(key->tpm, rc);
  return rc;
}

edgekey_tpm *edgekey_tpm_key_context(const edgekey_tpm_key *key) { return key->tpm; }

TSS2_RC edgekey_tpm_key_load_locked(edgekey_tpm_key *key, ESYS_CONTEXT *esys, ESYS_TR *handle,
                                    const char **cmd) {
  key->last_use = ++key->tpm->use_clock;
  TSS2_RC rc = load_locked(key, esys, cmd);
  if (rc == TSS2_RC_SUCCESS && handle != NULL) *handle = key->handle;
  return rc;
}

/* Both keys loaded (loading the second may have evicted the first to make room). */
static TSS2_RC load_pair_locked(edgekey_tpm_key *a, edgekey_tpm_key *b, ESYS_CONTEXT *esys,
                                const char **cmd) {
  for (int attempt = 0; attempt < 2; attempt++) {
    a->last_use = b->last_use = ++a->tpm->use_clock;
    TSS2_RC rc = load_locked(a, esys, cmd);
    if (rc == TSS2_RC_SUCCESS) rc = load_locked(b, esys, cmd);
    if (rc != TSS2_RC_SUCCESS) return rc;
    if (a->handle != ESYS_TR_NONE && a->generation == a->tpm->generation) return rc;
  }
  return TPM2_RC_OBJECT_MEMORY;
}

static TSS2_RC certify_locked(edgekey_tpm_key *key, edgekey_tpm_key *ak, ESYS_CONTEXT *esys,
                              const TPM2B_DATA *qualifying, TPM2B_ATTEST *attest_out,
                              TPMT_SIGNATURE *signature_out) {
  /* The AK's own scheme (TPM2_ALG_NULL here): ECDSA or RSASSA with its hash, fixed at creation. */
  TPMT_SIG_SCHEME scheme = {.scheme = TPM2_ALG_NULL};
  TPM2B_ATTEST *attest = NULL;
  TPMT_SIGNATURE *signature = NULL;
  /* The object's ADMIN role (its auth value: no adminWithPolicy), the AK's USER role. */
  TSS2_RC rc = Esys_Certify(esys, key->handle, ak->handle, ESYS_TR_PASSWORD, ESYS_TR_PASSWORD,
                            ESYS_TR_NONE, qualifying, &scheme, &attest, &signature);
  if (rc == TSS2_RC_SUCCESS) {
    *attest_out = *attest;
    *signature_out = *signature;
  }
  Esys_Free(attest);
  Esys_Free(signature);
  return rc;
}

TSS2_RC edgekey_tpm_key_certify(edgekey_tpm_key *key, edgekey_tpm_key *ak,
                                const uint8_t *qualifying, size_t qualifying_len,
                                TPM2B_ATTEST *attest, TPMT_SIGNATURE *signature,
                                const char **cmd) {
  if (key == NULL || ak == NULL || attest == NULL || signature == NULL ||
      key->tpm != ak->tpm || (qualifying == NULL && qualifying_len > 0) ||
      qualifying_len > sizeof(((TPM2B_DATA *)0)->buffer))
    return EDGEKEY_RC_BAD_ARGUMENT;
  TPM2B_DATA data = {.size = (UINT16)qualifying_len};
  if (qualifying_len > 0) memcpy(data.buffer, qualifying, qualifying_len);
  TSS2_RC rc;
  ESYS_CONTEXT *esys = edgekey_tpm_acquire(key->tpm, &rc);
  if (esys == NULL) {
    if (cmd != NULL) *cmd = "Esys_Initialize";
    return rc;
  }
  rc = load_pair_locked(key, ak, esys, cmd);
  if (rc == TSS2_RC_SUCCESS) {
    rc = certify_locked(key, ak, esys, &data, attest, signature);
    if (rc == TPM2_RC_INITIALIZE) Esys_Startup(esys, TPM2_SU_CLEAR);
    if (rc == TPM2_RC_INITIALIZE || edgekey_rc_is_missing_object(rc)) {
      /* The TPM lost one of them (reset, flushed by another process): load both once more. */
      unload_locked(key, esys, 0);
      unload_locked(ak, esys, 0);
      rc = load_pair_locked(key, ak, esys, cmd);
      if (rc == TSS2_RC_SUCCESS) {
        rc = certify_locked(key, ak, esys, &data, attest, signature);
        if (rc != TSS2_RC_SUCCESS && cmd != NULL) *cmd = "TPM2_Certify";
      }
    } else if (rc != TSS2_RC_SUCCESS && cmd != NULL) {
      *cmd = "TPM2_Certify";
    }
  }
  edgekey_tpm_release_after(key->tpm, rc);
  return rc;
}
