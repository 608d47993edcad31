/*
 * The OpenSSL 3 provider: EC and RSA keys whose private half is a TPM object.
 *
 * Built in, not a module: edgekey_provider_load() registers it in the default library context
 * beside the default provider, which keeps doing every digest, verification, random number
 * and cipher. This provider implements exactly two operations:
 *
 *   keymgmt   "EC", "RSA"   a reference to an edgekey_tpm_key plus a software copy of its
 *                           public half (default provider), which answers every parameter
 *   signature "EDGEKEY-ECDSA", "EDGEKEY-RSA"   hash in software, one TPM2_Sign
 *
 * The signature algorithms have names of their own so that OpenSSL never picks them for a
 * software key, and never picks the default provider's for ours: OpenSSL 3.0 fetches the
 * signature by the name our keymgmt gives, then exports the key to that implementation's
 * provider. Export refuses any selection with the private key in it, so a TPM key can never
 * be handed to software as if its public half were the whole key.
 */
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/provider.h>
#include <openssl/rsa.h>
#include <tss2/tss2_rc.h>

#include "edgekey_provider.h"
#include "internal.h"

#define PROVIDER_NAME "edgekey"
#define PROPS "provider=edgekey"
#define KEY_REF_PARAM "edgekey-tpm-key"

/* ---- Errors ------------------------------------------------------------------------------- */

/* Reasons in our own library's error space, reported through the core's new_error/vset. */
enum {
  R_TPM_SIGN_FAILED = 1,
  R_NO_PRIVATE_KEY,
  R_UNSUPPORTED_DIGEST,
  R_UNSUPPORTED_PADDING,
  R_PSS_SALT,
  R_BUFFER_TOO_SMALL,
  R_EXPORT_PRIVATE,
};

static OSSL_FUNC_core_new_error_fn *core_new_error;
static OSSL_FUNC_core_set_error_debug_fn *core_set_error_debug;
static OSSL_FUNC_core_vset_error_fn *core_vset_error;

typedef struct {
  const OSSL_CORE_HANDLE *handle;
} provider_ctx;

/* The last error this thread raised, kept apart from OpenSSL's error queue, which libraries
 * between us and the handshake (libmosquitto) drain before the caller can read it. */
static __thread char thread_error[256];

const char *edgekey_provider_thread_error(void) { return thread_error; }
void edgekey_provider_thread_error_clear(void) { thread_error[0] = '\0'; }

static void raise_error(provider_ctx *prov, int reason, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(thread_error, sizeof(thread_error), fmt, ap);
  va_end(ap);
  if (core_new_error == NULL || prov == NULL) return;
  core_new_error(prov->handle);
  core_set_error_debug(prov->handle, __FILE__, __LINE__, "edgekey");
  va_start(ap, fmt);
  core_vset_error(prov->handle, (uint32_t)reason, fmt, ap);
  va_end(ap);
}

/* ---- Key objects -------------------------------------------------------------------------- */

typedef enum { KEY_EC = 1, KEY_RSA = 2 } key_type;

typedef struct {
  provider_ctx *prov;
  key_type type;
  atomic_int refs;
  edgekey_tpm_key *tpm_key; /* NULL for a public-only key (a certificate's, when matching) */
  EVP_PKEY *pub;            /* software public half, default provider; NULL while empty */
} ek_key;

static ek_key *key_new(provider_ctx *prov, key_type type) {
  ek_key *k = calloc(1, sizeof(*k));
  if (k == NULL) return NULL;
  k->prov = prov;
  k->type = type;
  atomic_init(&k->refs, 1);
  return k;
}

static void key_free(void *vkey) {
  ek_key *k = vkey;
  if (k == NULL || atomic_fetch_sub(&k->refs, 1) != 1) return;
  EVP_PKEY_free(k->pub);
  edgekey_tpm_key_free(k->tpm_key);
  free(k);
}

static ek_key *key_up(ek_key *k) {
  atomic_fetch_add(&k->refs, 1);
  return k;
}

static void *ec_new(void *prov) { return key_new(prov, KEY_EC); }
static void *rsa_new(void *prov) { return key_new(prov, KEY_RSA); }

static int key_has(const void *vkey, int selection) {
  const ek_key *k = vkey;
  if (k == NULL) return 0;
  if ((selection & OSSL_KEYMGMT_SELECT_KEYPAIR) != 0 && k->pub == NULL) return 0;
  if ((selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) != 0 && k->tpm_key == NULL) return 0;
  return 1;
}

static int key_match(const void *va, const void *vb, int selection) {
  const ek_key *a = va, *b = vb;
  if (a->pub == NULL || b->pub == NULL) return 0;
  /* Equal public halves are the same key pair, whether or not we hold the private half. */
  (void)selection;
  return EVP_PKEY_eq(a->pub, b->pub) == 1;
}

/* The TPM key carried through OSSL_PARAM by edgekey_evp_pkey(), or NULL. */
static edgekey_tpm_key *key_ref_param(const OSSL_PARAM params[]) {
  const OSSL_PARAM *p = OSSL_PARAM_locate_const(params, KEY_REF_PARAM);
  if (p == NULL || p->data_type != OSSL_PARAM_OCTET_STRING || p->data_size != sizeof(void *))
    return NULL;
  edgekey_tpm_key *key;
  memcpy(&key, p->data, sizeof(key));
  return key != NULL && key->magic == EDGEKEY_KEY_MAGIC ? key : NULL;
}

static int key_import(void *vkey, int selection, const OSSL_PARAM params[]) {
  ek_key *k = vkey;
  if (k == NULL || k->pub != NULL) return 0;
  edgekey_tpm_key *tpm_key = key_ref_param(params);
  if (tpm_key != NULL) {
    const TPMT_PUBLIC *p = &edgekey_tpm_key_public(tpm_key)->publicArea;
    if ((k->type == KEY_EC) != (p->type == TPM2_ALG_ECC)) return 0;
    k->pub = edgekey_public_to_evp(edgekey_tpm_key_public(tpm_key));
    if (k->pub == NULL) return 0;
    k->tpm_key = edgekey_tpm_key_ref(tpm_key);
    return 1;
  }
  /* Anything else is someone's public key (a certificate's): keep the public half only. A
   * software private key is never taken over. */
  int sel = selection & (OSSL_KEYMGMT_SELECT_PUBLIC_KEY | OSSL_KEYMGMT_SELECT_ALL_PARAMETERS);
  if ((sel & OSSL_KEYMGMT_SELECT_PUBLIC_KEY) == 0) return 0;
  EVP_PKEY_CTX *ctx =
      EVP_PKEY_CTX_new_from_name(NULL, k->type == KEY_EC ? "EC" : "RSA", "provider=default");
  int ok = ctx != NULL && EVP_PKEY_fromdata_init(ctx) > 0 &&
           EVP_PKEY_fromdata(ctx, &k->pub, EVP_PKEY_PUBLIC_KEY, (OSSL_PARAM *)params) > 0;
  EVP_PKEY_CTX_free(ctx);
  return ok;
}

static const OSSL_PARAM ec_public_types[] = {
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, NULL, 0),
    OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, NULL, 0),
    OSSL_PARAM_octet_string(KEY_REF_PARAM, NULL, 0), OSSL_PARAM_END};
static const OSSL_PARAM rsa_public_types[] = {
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_N, NULL, 0), OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_E, NULL, 0),
    OSSL_PARAM_octet_string(KEY_REF_PARAM, NULL, 0), OSSL_PARAM_END};

static const OSSL_PARAM *ec_import_types(int selection) {
  return (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) ? NULL : ec_public_types;
}
static const OSSL_PARAM *rsa_import_types(int selection) {
  return (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) ? NULL : rsa_public_types;
}

static int key_export(void *vkey, int selection, OSSL_CALLBACK *cb, void *cbarg) {
  ek_key *k = vkey;
  if (k == NULL || k->pub == NULL) return 0;
  if (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) {
    /* The private key cannot leave the TPM; handing out the public half instead would make
     * OpenSSL sign with a software key that has no private half. */
    raise_error(k->prov, R_EXPORT_PRIVATE, "a TPM-held private key cannot be exported");
    return 0;
  }
  return EVP_PKEY_export(k->pub, selection, cb, cbarg);
}

static const OSSL_PARAM *ec_export_types(int selection) { return ec_import_types(selection); }
static const OSSL_PARAM *rsa_export_types(int selection) { return rsa_import_types(selection); }

static int key_get_params(void *vkey, OSSL_PARAM params[]) {
  ek_key *k = vkey;
  if (k == NULL || k->pub == NULL) return 0;
  /* Every parameter is the public key's, answered in memory by the software copy. */
  return EVP_PKEY_get_params(k->pub, params);
}

static const OSSL_PARAM key_gettable[] = {
    OSSL_PARAM_int(OSSL_PKEY_PARAM_BITS, NULL),
    OSSL_PARAM_int(OSSL_PKEY_PARAM_SECURITY_BITS, NULL),
    OSSL_PARAM_int(OSSL_PKEY_PARAM_MAX_SIZE, NULL),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_DEFAULT_DIGEST, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, NULL, 0),
    OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, NULL, 0),
    OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, NULL, 0),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_EC_PUB_X, NULL, 0),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_EC_PUB_Y, NULL, 0),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_N, NULL, 0),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_E, NULL, 0),
    OSSL_PARAM_END};

static const OSSL_PARAM *key_gettable_params(void *prov) {
  (void)prov;
  return key_gettable;
}

static const char *ec_query_operation_name(int operation_id) {
  return operation_id == OSSL_OP_SIGNATURE ? "EDGEKEY-ECDSA" : NULL;
}
static const char *rsa_query_operation_name(int operation_id) {
  return operation_id == OSSL_OP_SIGNATURE ? "EDGEKEY-RSA" : NULL;
}

static void *key_dup(const void *vkey, int selection) {
  (void)selection;
  /* Immutable once imported: a duplicate is another reference. */
  return vkey == NULL ? NULL : key_up((ek_key *)vkey);
}

#define KEYMGMT_DISPATCH(prefix)                                                                \
  static const OSSL_DISPATCH prefix##_keymgmt[] = {                                             \
      {OSSL_FUNC_KEYMGMT_NEW, (void (*)(void))prefix##_new},                                    \
      {OSSL_FUNC_KEYMGMT_FREE, (void (*)(void))key_free},                                       \
      {OSSL_FUNC_KEYMGMT_DUP, (void (*)(void))key_dup},                                         \
      {OSSL_FUNC_KEYMGMT_HAS, (void (*)(void))key_has},                                         \
      {OSSL_FUNC_KEYMGMT_MATCH, (void (*)(void))key_match},                                     \
      {OSSL_FUNC_KEYMGMT_IMPORT, (void (*)(void))key_import},                                   \
      {OSSL_FUNC_KEYMGMT_IMPORT_TYPES, (void (*)(void))prefix##_import_types},                  \
      {OSSL_FUNC_KEYMGMT_EXPORT, (void (*)(void))key_export},                                   \
      {OSSL_FUNC_KEYMGMT_EXPORT_TYPES, (void (*)(void))prefix##_export_types},                  \
      {OSSL_FUNC_KEYMGMT_GET_PARAMS, (void (*)(void))key_get_params},                           \
      {OSSL_FUNC_KEYMGMT_GETTABLE_PARAMS, (void (*)(void))key_gettable_params},                 \
      {OSSL_FUNC_KEYMGMT_QUERY_OPERATION_NAME, (void (*)(void))prefix##_query_operation_name},  \
      {0, NULL}}

KEYMGMT_DISPATCH(ec);
KEYMGMT_DISPATCH(rsa);

/* ---- Signature ---------------------------------------------------------------------------- */

typedef struct {
  provider_ctx *prov;
  ek_key *key;
  const char *md_name; /* canonical: "SHA256", "SHA384", "SHA512" */
  TPMI_ALG_HASH hash;
  size_t md_size;
  EVP_MD_CTX *md_ctx; /* for digest-sign update/final */
  int pad;            /* RSA_PKCS1_PADDING or RSA_PKCS1_PSS_PADDING */
  int saltlen;        /* RSA_PSS_SALTLEN_DIGEST (or the digest length) is all TPMs sign */
} sig_ctx;

static void *sig_newctx(void *prov, const char *propq) {
  (void)propq;
  sig_ctx *c = calloc(1, sizeof(*c));
  if (c == NULL) return NULL;
  c->prov = prov;
  c->pad = RSA_PKCS1_PADDING;
  c->saltlen = RSA_PSS_SALTLEN_DIGEST;
  return c;
}

static void sig_freectx(void *vctx) {
  sig_ctx *c = vctx;
  if (c == NULL) return;
  EVP_MD_CTX_free(c->md_ctx);
  key_free(c->key);
  free(c);
}

static void *sig_dupctx(void *vctx) {
  sig_ctx *c = vctx;
  sig_ctx *d = calloc(1, sizeof(*d));
  if (d == NULL) return NULL;
  *d = *c;
  d->md_ctx = NULL;
  if (c->key != NULL) key_up(c->key);
  if (c->md_ctx != NULL) {
    d->md_ctx = EVP_MD_CTX_new();
    if (d->md_ctx == NULL || !EVP_MD_CTX_copy_ex(d->md_ctx, c->md_ctx)) {
      sig_freectx(d);
      return NULL;
    }
  }
  return d;
}

/* Digests the TPM signs with here. SHA-1 is refused: no modern TLS peer needs it. */
static int set_digest(sig_ctx *c, const char *name) {
  if (name == NULL) name = "SHA256";
  static const struct {
    const char *names[4];
    const char *canonical;
    TPMI_ALG_HASH hash;
    size_t size;
  } table[] = {
      {{"SHA256", "SHA2-256", "SHA-256", "2.16.840.1.101.3.4.2.1"}, "SHA256", TPM2_ALG_SHA256, 32},
      {{"SHA384", "SHA2-384", "SHA-384", "2.16.840.1.101.3.4.2.2"}, "SHA384", TPM2_ALG_SHA384, 48},
      {{"SHA512", "SHA2-512", "SHA-512", "2.16.840.1.101.3.4.2.3"}, "SHA512", TPM2_ALG_SHA512, 64},
  };
  for (size_t i = 0; i < sizeof(table) / sizeof(table[0]); i++) {
    for (size_t j = 0; j < 4; j++) {
      if (OPENSSL_strcasecmp(name, table[i].names[j]) == 0) {
        c->md_name = table[i].canonical;
        c->hash = table[i].hash;
        c->md_size = table[i].size;
        return 1;
      }
    }
  }
  raise_error(c->prov, R_UNSUPPORTED_DIGEST, "digest %s is not signed by EdgeKey TPM keys", name);
  return 0;
}

static int sig_set_ctx_params(void *vctx, const OSSL_PARAM params[]);

static int sig_init(void *vctx, void *vkey, const OSSL_PARAM params[]) {
  sig_ctx *c = vctx;
  if (vkey != NULL) {
    ek_key *k = vkey;
    if (k->tpm_key == NULL) {
      raise_error(c->prov, R_NO_PRIVATE_KEY, "the key has no TPM-held private half");
      return 0;
    }
    key_free(c->key);
    c->key = key_up(k);
  }
  if (c->key == NULL) return 0;
  c->md_name = NULL;
  c->pad = RSA_PKCS1_PADDING;
  c->saltlen = RSA_PSS_SALTLEN_DIGEST;
  return sig_set_ctx_params(c, params);
}

/* Max signature size, from memory. */
static size_t sig_max_size(const sig_ctx *c) { return (size_t)EVP_PKEY_get_size(c->key->pub); }

/* A PSS signature must verify with salt = digest length: TLS 1.3 requires it and some real
 * TPMs use the maximum salt instead. Checked in software on the key's first PSS signature. */
static int pss_salt_is_digest_length(sig_ctx *c, const uint8_t *digest, const uint8_t *sig,
                                     size_t sig_len) {
  EVP_PKEY_CTX *v = EVP_PKEY_CTX_new_from_pkey(NULL, c->key->pub, "provider=default");
  EVP_MD *md = EVP_MD_fetch(NULL, c->md_name, "provider=default");
  int ok = v != NULL && md != NULL && EVP_PKEY_verify_init(v) > 0 &&
           EVP_PKEY_CTX_set_rsa_padding(v, RSA_PKCS1_PSS_PADDING) > 0 &&
           EVP_PKEY_CTX_set_signature_md(v, md) > 0 &&
           EVP_PKEY_CTX_set_rsa_pss_saltlen(v, RSA_PSS_SALTLEN_DIGEST) > 0 &&
           EVP_PKEY_verify(v, sig, sig_len, digest, c->md_size) == 1;
  EVP_MD_free(md);
  EVP_PKEY_CTX_free(v);
  ERR_clear_error();
  return ok;
}

static int sign_digest(sig_ctx *c, unsigned char *sig, size_t *siglen, size_t sigsize,
                       const unsigned char *digest, size_t digest_len) {
  size_t max = sig_max_size(c);
  if (sig == NULL) {
    *siglen = max;
    return 1;
  }
  if (c->md_name == NULL) {
    /* Raw EVP_PKEY_sign without a digest set: infer it from the length. */
    if (!set_digest(c, digest_len == 48 ? "SHA384" : digest_len == 64 ? "SHA512" : "SHA256"))
      return 0;
  }
  if (digest_len != c->md_size) {
    raise_error(c->prov, R_UNSUPPORTED_DIGEST, "a %s digest is %zu bytes, not %zu", c->md_name,
                c->md_size, digest_len);
    return 0;
  }
  TPMI_ALG_SIG_SCHEME scheme = TPM2_ALG_ECDSA;
  if (c->key->type == KEY_RSA) {
    if (c->pad == RSA_PKCS1_PSS_PADDING) {
      if (c->saltlen != RSA_PSS_SALTLEN_DIGEST && c->saltlen != (int)c->md_size &&
          c->saltlen != RSA_PSS_SALTLEN_AUTO) {
        raise_error(c->prov, R_PSS_SALT,
                    "a TPM signs RSA-PSS with salt = digest length only (asked for %d)",
                    c->saltlen);
        return 0;
      }
      scheme = TPM2_ALG_RSAPSS;
    } else {
      scheme = TPM2_ALG_RSASSA;
    }
  }
  TPMT_SIGNATURE tpm_sig;
  const char *cmd = NULL;
  TSS2_RC rc = edgekey_tpm_key_sign(c->key->tpm_key, scheme, c->hash, digest, digest_len,
                                    &tpm_sig, &cmd);
  if (rc != TSS2_RC_SUCCESS) {
    raise_error(c->prov, R_TPM_SIGN_FAILED, "%s failed: 0x%x %s", cmd ? cmd : "TPM2_Sign", rc,
                Tss2_RC_Decode(rc));
    return 0;
  }
  uint8_t buf[1024];
  size_t len = 0;
  if (edgekey_signature_encode(&tpm_sig, buf, sizeof(buf), &len) != TSS2_RC_SUCCESS) {
    raise_error(c->prov, R_TPM_SIGN_FAILED, "the TPM returned a signature that cannot be encoded");
    return 0;
  }
  if (len > sigsize) {
    raise_error(c->prov, R_BUFFER_TOO_SMALL, "signature buffer of %zu bytes, %zu needed", sigsize,
                len);
    return 0;
  }
  if (scheme == TPM2_ALG_RSAPSS && !atomic_load(&c->key->tpm_key->pss_checked)) {
    if (!pss_salt_is_digest_length(c, digest, buf, len)) {
      raise_error(c->prov, R_PSS_SALT,
                  "this TPM signs RSA-PSS with a salt length other than the digest length; "
                  "TLS 1.3 peers reject it: use an ECC key or RSA PKCS#1 v1.5 with TLS 1.2");
      return 0;
    }
    atomic_store(&c->key->tpm_key->pss_checked, 1);
  }
  memcpy(sig, buf, len);
  *siglen = len;
  return 1;
}

static int sig_sign(void *vctx, unsigned char *sig, size_t *siglen, size_t sigsize,
                    const unsigned char *tbs, size_t tbslen) {
  return sign_digest(vctx, sig, siglen, sigsize, tbs, tbslen);
}

static int sig_digest_sign_init(void *vctx, const char *mdname, void *vkey,
                                const OSSL_PARAM params[]) {
  sig_ctx *c = vctx;
  if (!sig_init(c, vkey, params)) return 0;
  if (!set_digest(c, mdname != NULL ? mdname : c->md_name)) return 0;
  EVP_MD_CTX_free(c->md_ctx);
  c->md_ctx = NULL;
  return 1;
}

static int start_digest(sig_ctx *c) {
  if (c->md_ctx != NULL) return 1;
  EVP_MD *md = EVP_MD_fetch(NULL, c->md_name, "provider=default");
  c->md_ctx = EVP_MD_CTX_new();
  int ok = md != NULL && c->md_ctx != NULL && EVP_DigestInit_ex(c->md_ctx, md, NULL) > 0;
  EVP_MD_free(md);
  return ok;
}

static int sig_digest_sign_update(void *vctx, const unsigned char *data, size_t len) {
  sig_ctx *c = vctx;
  return start_digest(c) && EVP_DigestUpdate(c->md_ctx, data, len) > 0;
}

static int sig_digest_sign_final(void *vctx, unsigned char *sig, size_t *siglen, size_t sigsize) {
  sig_ctx *c = vctx;
  if (sig == NULL) return sign_digest(c, NULL, siglen, sigsize, NULL, 0);
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  if (!start_digest(c) || EVP_DigestFinal_ex(c->md_ctx, digest, &n) <= 0) return 0;
  EVP_MD_CTX_free(c->md_ctx);
  c->md_ctx = NULL;
  return sign_digest(c, sig, siglen, sigsize, digest, n);
}

static int sig_digest_sign(void *vctx, unsigned char *sig, size_t *siglen, size_t sigsize,
                           const unsigned char *tbs, size_t tbslen) {
  sig_ctx *c = vctx;
  if (sig == NULL) return sign_digest(c, NULL, siglen, sigsize, NULL, 0);
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  EVP_MD *md = EVP_MD_fetch(NULL, c->md_name, "provider=default");
  int ok = md != NULL && EVP_Digest(tbs, tbslen, digest, &n, md, NULL) > 0;
  EVP_MD_free(md);
  return ok && sign_digest(c, sig, siglen, sigsize, digest, n);
}

/* DER AlgorithmIdentifiers for what the TPM signs (X.509, CSRs). */
static const uint8_t ALG_ECDSA_SHA256[] = {0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48,
                                           0xce, 0x3d, 0x04, 0x03, 0x02};
static const uint8_t ALG_ECDSA_SHA384[] = {0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48,
                                           0xce, 0x3d, 0x04, 0x03, 0x03};
static const uint8_t ALG_ECDSA_SHA512[] = {0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48,
                                           0xce, 0x3d, 0x04, 0x03, 0x04};
static const uint8_t ALG_RSA_SHA256[] = {0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86,
                                         0xf7, 0x0d, 0x01, 0x01, 0x0b, 0x05, 0x00};
static const uint8_t ALG_RSA_SHA384[] = {0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86,
                                         0xf7, 0x0d, 0x01, 0x01, 0x0c, 0x05, 0x00};
static const uint8_t ALG_RSA_SHA512[] = {0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86,
                                         0xf7, 0x0d, 0x01, 0x01, 0x0d, 0x05, 0x00};

/*
 * RSASSA-PSS with explicit parameters: hash, MGF1 with the same hash, salt = digest length.
 * SEQUENCE { OID 1.2.840.113549.1.1.10, SEQUENCE { [0] hashAlg, [1] MGF1(hashAlg), [2] salt } }
 */
static size_t pss_algorithm_id(TPMI_ALG_HASH hash, uint8_t *out) {
  uint8_t last = hash == TPM2_ALG_SHA256 ? 0x01 : hash == TPM2_ALG_SHA384 ? 0x02 : 0x03;
  uint8_t salt = hash == TPM2_ALG_SHA256 ? 32 : hash == TPM2_ALG_SHA384 ? 48 : 64;
  /* hashAlgorithm: SEQUENCE { OID 2.16.840.1.101.3.4.2.x } (NULL parameters omitted) */
  const uint8_t hash_alg[] = {0x30, 0x0b, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01,
                              0x65, 0x03, 0x04, 0x02, last};
  const uint8_t pss_oid[] = {0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a};
  const uint8_t mgf1_oid[] = {0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x08};
  uint8_t params[64];
  size_t n = 0;
  params[n++] = 0xa0; /* [0] hashAlgorithm */
  params[n++] = sizeof(hash_alg);
  memcpy(params + n, hash_alg, sizeof(hash_alg));
  n += sizeof(hash_alg);
  params[n++] = 0xa1; /* [1] maskGenAlgorithm */
  params[n++] = 2 + sizeof(mgf1_oid) + sizeof(hash_alg);
  params[n++] = 0x30;
  params[n++] = sizeof(mgf1_oid) + sizeof(hash_alg);
  memcpy(params + n, mgf1_oid, sizeof(mgf1_oid));
  n += sizeof(mgf1_oid);
  memcpy(params + n, hash_alg, sizeof(hash_alg));
  n += sizeof(hash_alg);
  params[n++] = 0xa2; /* [2] saltLength */
  params[n++] = 3;
  params[n++] = 0x02;
  params[n++] = 1;
  params[n++] = salt;
  size_t m = 0;
  out[m++] = 0x30;
  out[m++] = (uint8_t)(sizeof(pss_oid) + 2 + n);
  memcpy(out + m, pss_oid, sizeof(pss_oid));
  m += sizeof(pss_oid);
  out[m++] = 0x30;
  out[m++] = (uint8_t)n;
  memcpy(out + m, params, n);
  return m + n;
}

static int sig_get_ctx_params(void *vctx, OSSL_PARAM params[]) {
  sig_ctx *c = vctx;
  OSSL_PARAM *p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_ALGORITHM_ID);
  if (p != NULL && c->key != NULL) {
    const char *md = c->md_name != NULL ? c->md_name : "SHA256";
    TPMI_ALG_HASH h = strcmp(md, "SHA384") == 0   ? TPM2_ALG_SHA384
                      : strcmp(md, "SHA512") == 0 ? TPM2_ALG_SHA512
                                                  : TPM2_ALG_SHA256;
    const uint8_t *der;
    size_t len;
    uint8_t pss[96];
    if (c->key->type == KEY_EC) {
      der = h == TPM2_ALG_SHA384 ? ALG_ECDSA_SHA384 : h == TPM2_ALG_SHA512 ? ALG_ECDSA_SHA512 : ALG_ECDSA_SHA256;
      len = sizeof(ALG_ECDSA_SHA256);
    } else if (c->pad == RSA_PKCS1_PSS_PADDING) {
      len = pss_algorithm_id(h, pss);
      der = pss;
    } else {
      der = h == TPM2_ALG_SHA384 ? ALG_RSA_SHA384 : h == TPM2_ALG_SHA512 ? ALG_RSA_SHA512 : ALG_RSA_SHA256;
      len = sizeof(ALG_RSA_SHA256);
    }
    if (!OSSL_PARAM_set_octet_string(p, der, len)) return 0;
  }
  p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_DIGEST);
  if (p != NULL && !OSSL_PARAM_set_utf8_string(p, c->md_name != NULL ? c->md_name : "SHA256"))
    return 0;
  p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_PAD_MODE);
  if (p != NULL) {
    int ok = p->data_type == OSSL_PARAM_INTEGER
                 ? OSSL_PARAM_set_int(p, c->pad)
                 : OSSL_PARAM_set_utf8_string(p, c->pad == RSA_PKCS1_PSS_PADDING ? "pss" : "pkcs1");
    if (!ok) return 0;
  }
  p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_PSS_SALTLEN);
  if (p != NULL) {
    int ok = p->data_type == OSSL_PARAM_INTEGER ? OSSL_PARAM_set_int(p, c->saltlen)
                                                : OSSL_PARAM_set_utf8_string(p, "digest");
    if (!ok) return 0;
  }
  return 1;
}

static int sig_set_ctx_params(void *vctx, const OSSL_PARAM params[]) {
  sig_ctx *c = vctx;
  if (params == NULL) return 1;
  const OSSL_PARAM *p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_DIGEST);
  if (p != NULL) {
    const char *name = NULL;
    if (!OSSL_PARAM_get_utf8_string_ptr(p, &name) || !set_digest(c, name)) return 0;
  }
  p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_PAD_MODE);
  if (p != NULL) {
    int pad = 0;
    const char *s = NULL;
    if (p->data_type == OSSL_PARAM_UTF8_STRING && OSSL_PARAM_get_utf8_string_ptr(p, &s))
      pad = strcmp(s, "pss") == 0 ? RSA_PKCS1_PSS_PADDING : strcmp(s, "pkcs1") == 0 ? RSA_PKCS1_PADDING : -1;
    else if (!OSSL_PARAM_get_int(p, &pad))
      return 0;
    if (c->key == NULL || c->key->type != KEY_RSA ||
        (pad != RSA_PKCS1_PADDING && pad != RSA_PKCS1_PSS_PADDING)) {
      raise_error(c->prov, R_UNSUPPORTED_PADDING, "the TPM signs PKCS#1 v1.5 or PSS only");
      return 0;
    }
    c->pad = pad;
  }
  p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_PSS_SALTLEN);
  if (p != NULL) {
    int salt = 0;
    const char *s = NULL;
    if (p->data_type == OSSL_PARAM_UTF8_STRING && OSSL_PARAM_get_utf8_string_ptr(p, &s)) {
      salt = strcmp(s, "digest") == 0 ? RSA_PSS_SALTLEN_DIGEST
             : strcmp(s, "auto") == 0 ? RSA_PSS_SALTLEN_AUTO
             : strcmp(s, "max") == 0  ? RSA_PSS_SALTLEN_MAX
                                      : atoi(s);
    } else if (!OSSL_PARAM_get_int(p, &salt)) {
      return 0;
    }
    c->saltlen = salt;
  }
  p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_MGF1_DIGEST);
  if (p != NULL) {
    const char *name = NULL;
    if (!OSSL_PARAM_get_utf8_string_ptr(p, &name)) return 0;
    sig_ctx probe = *c;
    if (!set_digest(&probe, name) || (c->md_name != NULL && strcmp(probe.md_name, c->md_name) != 0)) {
      raise_error(c->prov, R_UNSUPPORTED_DIGEST, "the TPM uses MGF1 with the signature's digest");
      return 0;
    }
  }
  return 1;
}

static const OSSL_PARAM sig_gettable[] = {
    OSSL_PARAM_octet_string(OSSL_SIGNATURE_PARAM_ALGORITHM_ID, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_DIGEST, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PAD_MODE, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PSS_SALTLEN, NULL, 0), OSSL_PARAM_END};
static const OSSL_PARAM sig_settable[] = {
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_DIGEST, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PROPERTIES, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PAD_MODE, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PSS_SALTLEN, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_MGF1_DIGEST, NULL, 0), OSSL_PARAM_END};

static const OSSL_PARAM *sig_gettable_ctx_params(void *vctx, void *prov) {
  (void)vctx;
  (void)prov;
  return sig_gettable;
}
static const OSSL_PARAM *sig_settable_ctx_params(void *vctx, void *prov) {
  (void)vctx;
  (void)prov;
  return sig_settable;
}

static const OSSL_DISPATCH signature_functions[] = {
    {OSSL_FUNC_SIGNATURE_NEWCTX, (void (*)(void))sig_newctx},
    {OSSL_FUNC_SIGNATURE_FREECTX, (void (*)(void))sig_freectx},
    {OSSL_FUNC_SIGNATURE_DUPCTX, (void (*)(void))sig_dupctx},
    {OSSL_FUNC_SIGNATURE_SIGN_INIT, (void (*)(void))sig_init},
    {OSSL_FUNC_SIGNATURE_SIGN, (void (*)(void))sig_sign},
    {OSSL_FUNC_SIGNATURE_DIGEST_SIGN_INIT, (void (*)(void))sig_digest_sign_init},
    {OSSL_FUNC_SIGNATURE_DIGEST_SIGN_UPDATE, (void (*)(void))sig_digest_sign_update},
    {OSSL_FUNC_SIGNATURE_DIGEST_SIGN_FINAL, (void (*)(void))sig_digest_sign_final},
    {OSSL_FUNC_SIGNATURE_DIGEST_SIGN, (void (*)(void))sig_digest_sign},
    {OSSL_FUNC_SIGNATURE_GET_CTX_PARAMS, (void (*)(void))sig_get_ctx_params},
    {OSSL_FUNC_SIGNATURE_GETTABLE_CTX_PARAMS, (void (*)(void))sig_gettable_ctx_params},
    {OSSL_FUNC_SIGNATURE_SET_CTX_PARAMS, (void (*)(void))sig_set_ctx_params},
    {OSSL_FUNC_SIGNATURE_SETTABLE_CTX_PARAMS, (void (*)(void))sig_settable_ctx_params},
    {0, NULL}};

/* ---- The provider ------------------------------------------------------------------------- */

static const OSSL_ALGORITHM keymgmt_algorithms[] = {
    {"EC:id-ecPublicKey:1.2.840.10045.2.1", PROPS, ec_keymgmt, "EdgeKey TPM-held EC key"},
    {"RSA:rsaEncryption:1.2.840.113549.1.1.1", PROPS, rsa_keymgmt, "EdgeKey TPM-held RSA key"},
    {NULL, NULL, NULL, NULL}};
static const OSSL_ALGORITHM signature_algorithms[] = {
    {"EDGEKEY-ECDSA", PROPS, signature_functions, "ECDSA in the TPM"},
    {"EDGEKEY-RSA", PROPS, signature_functions, "RSA PKCS#1 v1.5 and PSS in the TPM"},
    {NULL, NULL, NULL, NULL}};

static const OSSL_ALGORITHM *query_operation(void *prov, int operation_id, int *no_cache) {
  (void)prov;
  *no_cache = 0;
  switch (operation_id) {
  case OSSL_OP_KEYMGMT: return keymgmt_algorithms;
  case OSSL_OP_SIGNATURE: return signature_algorithms;
  default: return NULL;
  }
}

static const OSSL_ITEM reason_strings[] = {
    {R_TPM_SIGN_FAILED, "TPM signing failed"},
    {R_NO_PRIVATE_KEY, "no TPM-held private key"},
    {R_UNSUPPORTED_DIGEST, "unsupported digest"},
    {R_UNSUPPORTED_PADDING, "unsupported padding"},
    {R_PSS_SALT, "RSA-PSS salt length"},
    {R_BUFFER_TOO_SMALL, "signature buffer too small"},
    {R_EXPORT_PRIVATE, "private key cannot be exported"},
    {0, NULL}};

static const OSSL_ITEM *get_reason_strings(void *prov) {
  (void)prov;
  return reason_strings;
}

static const OSSL_PARAM provider_gettable[] = {
    OSSL_PARAM_utf8_ptr(OSSL_PROV_PARAM_NAME, NULL, 0),
    OSSL_PARAM_utf8_ptr(OSSL_PROV_PARAM_VERSION, NULL, 0),
    OSSL_PARAM_int(OSSL_PROV_PARAM_STATUS, NULL), OSSL_PARAM_END};

static const OSSL_PARAM *provider_gettable_params(void *prov) {
  (void)prov;
  return provider_gettable;
}

static int provider_get_params(void *prov, OSSL_PARAM params[]) {
  (void)prov;
  OSSL_PARAM *p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_NAME);
  if (p != NULL && !OSSL_PARAM_set_utf8_ptr(p, "EdgeKey TPM provider")) return 0;
  p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_VERSION);
  if (p != NULL && !OSSL_PARAM_set_utf8_ptr(p, EDGEKEY_VERSION)) return 0;
  p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_STATUS);
  if (p != NULL && !OSSL_PARAM_set_int(p, 1)) return 0;
  return 1;
}

static void provider_teardown(void *prov) { free(prov); }

static const OSSL_DISPATCH provider_functions[] = {
    {OSSL_FUNC_PROVIDER_TEARDOWN, (void (*)(void))provider_teardown},
    {OSSL_FUNC_PROVIDER_GETTABLE_PARAMS, (void (*)(void))provider_gettable_params},
    {OSSL_FUNC_PROVIDER_GET_PARAMS, (void (*)(void))provider_get_params},
    {OSSL_FUNC_PROVIDER_QUERY_OPERATION, (void (*)(void))query_operation},
    {OSSL_FUNC_PROVIDER_GET_REASON_STRINGS, (void (*)(void))get_reason_strings},
    {0, NULL}};

static int provider_init(const OSSL_CORE_HANDLE *handle, const OSSL_DISPATCH *in,
                         const OSSL_DISPATCH **out, void **provctx) {
  for (; in->function_id != 0; in++) {
    switch (in->function_id) {
    case OSSL_FUNC_CORE_NEW_ERROR: core_new_error = OSSL_FUNC_core_new_error(in); break;
    case OSSL_FUNC_CORE_SET_ERROR_DEBUG:
      core_set_error_debug = OSSL_FUNC_core_set_error_debug(in);
      break;
    case OSSL_FUNC_CORE_VSET_ERROR: core_vset_error = OSSL_FUNC_core_vset_error(in); break;
    default: break;
    }
  }
  provider_ctx *prov = calloc(1, sizeof(*prov));
  if (prov == NULL) return 0;
  prov->handle = handle;
  *provctx = prov;
  *out = provider_functions;
  return 1;
}

static pthread_once_t load_once = PTHREAD_ONCE_INIT;
static OSSL_LIB_CTX *provider_libctx;

/* The provider lives in a library context of its own, with OpenSSL's default provider beside
 * it, never in the application's default context. Our keymgmt has to answer to "EC" and "RSA"
 * (libssl recognises a key's type by those names), and OpenSSL 3.0's method cache cannot keep
 * two providers' "EC" apart: EVP_DigestSignInit on a TPM key caches our keymgmt under the
 * empty query, and query_cmp ignores the provider when the lookup has none, so from then on an
 * unqualified EVP_KEYMGMT_fetch(NULL, "EC", NULL) elsewhere in the process - libssl choosing
 * its groups, an application generating a software key - could get ours and fail (TLS 1.2
 * without the P-curves, "operation not supported for this keytype"). No property query
 * prevents that, because a cache hit skips the query; a separate context does. An EVP_PKEY
 * made here works in every other context: the EVP layer follows the key's own keymgmt and
 * provider. Nothing in the application's context (its providers, its default properties,
 * FIPS mode) is touched. */
static void load_provider(void) {
  OSSL_LIB_CTX *libctx = OSSL_LIB_CTX_new();
  if (libctx == NULL) return;
  /* Encoders and decoders for the public half (SubjectPublicKeyInfo) come from the default
   * provider of this context; digests and verification are asked of the application's. */
  OSSL_PROVIDER *deflt = OSSL_PROVIDER_load(libctx, "default");
  OSSL_PROVIDER *ours = NULL;
  if (deflt != NULL && OSSL_PROVIDER_add_builtin(libctx, PROVIDER_NAME, provider_init) == 1)
    ours = OSSL_PROVIDER_load(libctx, PROVIDER_NAME);
  if (ours == NULL) {
    OSSL_PROVIDER_unload(deflt);
    OSSL_LIB_CTX_free(libctx);
    ERR_clear_error();
    return;
  }
  /* Within this context too, a fetch that does not name a provider prefers the default. */
  EVP_set_default_properties(libctx, "?provider=default");
  provider_libctx = libctx; /* lives as long as the process: keys made in it may outlive us */
}

int edgekey_provider_load(void) {
  pthread_once(&load_once, load_provider);
  return provider_libctx != NULL;
}

OSSL_LIB_CTX *edgekey_provider_libctx(void) {
  return edgekey_provider_load() ? provider_libctx : NULL;
}

EVP_PKEY *edgekey_evp_pkey(edgekey_tpm_key *key) {
  if (key == NULL || !edgekey_provider_load()) return NULL;
  const TPMT_PUBLIC *p = &edgekey_tpm_key_public(key)->publicArea;
  const char *name = p->type == TPM2_ALG_ECC ? "EC" : p->type == TPM2_ALG_RSA ? "RSA" : NULL;
  if (name == NULL) return NULL;
  EVP_PKEY *pkey = NULL;
  EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_name(provider_libctx, name, PROPS);
  OSSL_PARAM params[] = {OSSL_PARAM_construct_octet_string(KEY_REF_PARAM, &key, sizeof(key)),
                         OSSL_PARAM_construct_end()};
  if (ctx == NULL || EVP_PKEY_fromdata_init(ctx) <= 0 ||
      EVP_PKEY_fromdata(ctx, &pkey, EVP_PKEY_KEYPAIR, params) <= 0)
    pkey = NULL;
  EVP_PKEY_CTX_free(ctx);
  return pkey;
}

int edgekey_evp_pkey_is_tpm(const EVP_PKEY *pkey) {
  const OSSL_PROVIDER *prov = pkey == NULL ? NULL : EVP_PKEY_get0_provider(pkey);
  return prov != NULL && strcmp(OSSL_PROVIDER_get0_name(prov), PROVIDER_NAME) == 0;
}
