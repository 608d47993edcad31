/* TSS2 PRIVATE KEY (DER): the key file format of tpm2-openssl and tpm2-tss-engine. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/asn1t.h>
#include <openssl/err.h>
#include <openssl/objects.h>
#include <openssl/pem.h>
#include <tss2/tss2_mu.h>

#include "edgekey.h"

typedef struct {
  ASN1_OBJECT *type;
  ASN1_BOOLEAN empty_auth;
  ASN1_INTEGER *parent;
  ASN1_OCTET_STRING *pubkey;
  ASN1_OCTET_STRING *privkey;
} EDGEKEY_TSSPRIVKEY;

ASN1_SEQUENCE(EDGEKEY_TSSPRIVKEY) = {
    ASN1_SIMPLE(EDGEKEY_TSSPRIVKEY, type, ASN1_OBJECT),
    ASN1_EXP_OPT(EDGEKEY_TSSPRIVKEY, empty_auth, ASN1_BOOLEAN, 0),
    ASN1_SIMPLE(EDGEKEY_TSSPRIVKEY, parent, ASN1_INTEGER),
    ASN1_SIMPLE(EDGEKEY_TSSPRIVKEY, pubkey, ASN1_OCTET_STRING),
    ASN1_SIMPLE(EDGEKEY_TSSPRIVKEY, privkey, ASN1_OCTET_STRING),
} ASN1_SEQUENCE_END(EDGEKEY_TSSPRIVKEY)

IMPLEMENT_STATIC_ASN1_ALLOC_FUNCTIONS(EDGEKEY_TSSPRIVKEY)
IMPLEMENT_STATIC_ASN1_ENCODE_FUNCTIONS(EDGEKEY_TSSPRIVKEY)

/* 2.23.133.10.1.3: a loadable key (importable .4 and sealed .5 are not signing keys). */
static const unsigned char loadable_key_oid[] = {0x67, 0x81, 0x05, 0x0a, 0x01, 0x03};

static TSS2_RC fail(char *why, size_t why_len, const char *reason) {
  if (why != NULL && why_len > 0) snprintf(why, why_len, "%s", reason);
  return EDGEKEY_RC_BAD_KEYFILE;
}

TSS2_RC edgekey_keyfile_decode(const uint8_t *der, size_t der_len, edgekey_keyfile *out,
                               char *why, size_t why_len) {
  if (der == NULL || out == NULL) return EDGEKEY_RC_BAD_ARGUMENT;
  if (why != NULL && why_len > 0) why[0] = '\0';
  memset(out, 0, sizeof(*out));
  const unsigned char *p = der;
  EDGEKEY_TSSPRIVKEY *k = d2i_EDGEKEY_TSSPRIVKEY(NULL, &p, (long)der_len);
  TSS2_RC rc = TSS2_RC_SUCCESS;
  if (k == NULL) return fail(why, why_len, "not a TSS2 PRIVATE KEY structure (bad DER)");
  if ((size_t)(p - der) != der_len) {
    rc = fail(why, why_len, "trailing bytes after the key");
    goto out;
  }
  if (OBJ_length(k->type) != sizeof(loadable_key_oid) ||
      memcmp(OBJ_get0_data(k->type), loadable_key_oid, sizeof(loadable_key_oid)) != 0) {
    rc = fail(why, why_len, "not a loadable key (type OID is not 2.23.133.10.1.3)");
    goto out;
  }
  uint64_t parent = 0;
  if (!ASN1_INTEGER_get_uint64(&parent, k->parent) || parent > UINT32_MAX) {
    rc = fail(why, why_len, "parent handle is not a 32-bit TPM handle");
    goto out;
  }
  TPM2B_PUBLIC pub = {0};
  TPM2B_PRIVATE priv = {0};
  size_t offset = 0;
  size_t pub_len = (size_t)ASN1_STRING_length(k->pubkey);
  size_t priv_len = (size_t)ASN1_STRING_length(k->privkey);
  if (pub_len > sizeof(out->pub) ||
      Tss2_MU_TPM2B_PUBLIC_Unmarshal(ASN1_STRING_get0_data(k->pubkey), pub_len, &offset, &pub) !=
          TSS2_RC_SUCCESS ||
      offset != pub_len) {
    rc = fail(why, why_len, "public part is not a TPM2B_PUBLIC");
    goto out;
  }
  offset = 0;
  if (priv_len > sizeof(out->priv) ||
      Tss2_MU_TPM2B_PRIVATE_Unmarshal(ASN1_STRING_get0_data(k->privkey), priv_len, &offset,
                                      &priv) != TSS2_RC_SUCCESS ||
      offset != priv_len) {
    rc = fail(why, why_len, "private part is not a TPM2B_PRIVATE");
    goto out;
  }
  /* ASN1_BOOLEAN: -1 when absent, which DER's DEFAULT makes FALSE (a password is needed). */
  out->empty_auth = k->empty_auth > 0;
  out->parent = (uint32_t)parent;
  memcpy(out->pub, ASN1_STRING_get0_data(k->pubkey), pub_len);
  out->pub_len = pub_len;
  memcpy(out->priv, ASN1_STRING_get0_data(k->privkey), priv_len);
  out->priv_len = priv_len;
out:
  EDGEKEY_TSSPRIVKEY_free(k);
  return rc;
}

TSS2_RC edgekey_keyfile_encode(const edgekey_keyfile *in, uint8_t **der, size_t *der_len) {
  if (in == NULL || der == NULL || der_len == NULL || in->pub_len > sizeof(in->pub) ||
      in->priv_len > sizeof(in->priv))
    return EDGEKEY_RC_BAD_ARGUMENT;
  TSS2_RC rc = EDGEKEY_RC_MEMORY;
  unsigned char *buf = NULL;
  EDGEKEY_TSSPRIVKEY *k = EDGEKEY_TSSPRIVKEY_new();
  if (k == NULL) goto out;
  k->type = OBJ_txt2obj("2.23.133.10.1.3", 1);
  /* Written both ways. DER would leave out a FALSE that equals the default (ASN1_FBOOLEAN does),
   * but tpm2-openssl reads an absent emptyAuth as TRUE and then signs with an empty password
   * (0x9a2, and a dictionary-attack strike): a key with a password must say so explicitly. */
  k->empty_auth = in->empty_auth ? 0xff : 0;
  if (k->type == NULL || !ASN1_INTEGER_set_uint64(k->parent, in->parent) ||
      !ASN1_OCTET_STRING_set(k->pubkey, in->pub, (int)in->pub_len) ||
      !ASN1_OCTET_STRING_set(k->privkey, in->priv, (int)in->priv_len))
    goto out;
  int len = i2d_EDGEKEY_TSSPRIVKEY(k, &buf);
  if (len <= 0) goto out;
  *der = malloc((size_t)len);
  if (*der == NULL) goto out;
  memcpy(*der, buf, (size_t)len);
  *der_len = (size_t)len;
  rc = TSS2_RC_SUCCESS;
out:
  OPENSSL_free(buf);
  EDGEKEY_TSSPRIVKEY_free(k);
  return rc;
}

TSS2_RC edgekey_tpm_key_from_file(edgekey_tpm *tpm, const char *path, const uint8_t *auth,
                                  size_t auth_len, edgekey_tpm_key **out, char *why,
                                  size_t why_len) {
  if (why != NULL && why_len > 0) why[0] = '\0';
  if (tpm == NULL || path == NULL || out == NULL) return EDGEKEY_RC_BAD_ARGUMENT;
  *out = NULL;
  BIO *bio = BIO_new_file(path, "r");
  if (bio == NULL) {
    if (why != NULL) snprintf(why, why_len, "cannot open %s", path);
    ERR_clear_error();
    return EDGEKEY_RC_BAD_KEYFILE;
  }
  char *name = NULL, *header = NULL;
  unsigned char *der = NULL;
  long len = 0;
  TSS2_RC rc = EDGEKEY_RC_BAD_KEYFILE;
  if (PEM_read_bio(bio, &name, &header, &der, &len) != 1) {
    if (why != NULL) snprintf(why, why_len, "%s holds no PEM block", path);
  } else if (strcmp(name, "TSS2 PRIVATE KEY") != 0) {
    if (why != NULL) snprintf(why, why_len, "%s holds a %s, not a TSS2 PRIVATE KEY", path, name);
  } else {
    edgekey_keyfile kf;
    rc = edgekey_keyfile_decode(der, (size_t)len, &kf, why, why_len);
    if (rc == TSS2_RC_SUCCESS && !kf.empty_auth && auth_len == 0) {
      /* Refused before any TPM command: an empty auth for a key that has a password would only
       * cost a dictionary-attack strike. */
      if (why != NULL) snprintf(why, why_len, "%s says the key has a password; none was given", path);
      rc = EDGEKEY_RC_AUTH_REQUIRED;
    } else if (rc == TSS2_RC_SUCCESS)
      rc = edgekey_tpm_key_from_blobs(tpm, kf.parent, kf.pub, kf.pub_len, kf.priv, kf.priv_len,
                                      auth, auth_len, out);
  }
  ERR_clear_error();
  OPENSSL_free(name);
  OPENSSL_free(header);
  OPENSSL_free(der);
  BIO_free(bio);
  return rc;
}
