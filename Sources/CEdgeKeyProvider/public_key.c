/* TPM public areas and signatures converted to OpenSSL's encodings, in software. */
#include <stdlib.h>
#include <string.h>

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/x509.h>

#include "internal.h"

EVP_PKEY *edgekey_public_to_evp(const TPM2B_PUBLIC *pub) {
  const TPMT_PUBLIC *p = &pub->publicArea;
  EVP_PKEY *pkey = NULL;
  EVP_PKEY_CTX *ctx = NULL;
  OSSL_PARAM_BLD *bld = OSSL_PARAM_BLD_new();
  OSSL_PARAM *params = NULL;
  BIGNUM *n = NULL, *e = NULL;
  unsigned char point[1 + 2 * 66];
  if (bld == NULL) goto out;
  if (p->type == TPM2_ALG_ECC) {
    const char *group;
    size_t field;
    switch (p->parameters.eccDetail.curveID) {
    case TPM2_ECC_NIST_P256: group = "P-256"; field = 32; break;
    case TPM2_ECC_NIST_P384: group = "P-384"; field = 48; break;
    case TPM2_ECC_NIST_P521: group = "P-521"; field = 66; break;
    default: goto out;
    }
    const TPM2B_ECC_PARAMETER *x = &p->unique.ecc.x, *y = &p->unique.ecc.y;
    if (x->size > field || y->size > field) goto out;
    /* Uncompressed point; the TPM may drop leading zero bytes of a coordinate. */
    memset(point, 0, sizeof(point));
    point[0] = 0x04;
    memcpy(point + 1 + field - x->size, x->buffer, x->size);
    memcpy(point + 1 + 2 * field - y->size, y->buffer, y->size);
    if (!OSSL_PARAM_BLD_push_utf8_string(bld, OSSL_PKEY_PARAM_GROUP_NAME, group, 0) ||
        !OSSL_PARAM_BLD_push_octet_string(bld, OSSL_PKEY_PARAM_PUB_KEY, point, 1 + 2 * field))
      goto out;
    ctx = EVP_PKEY_CTX_new_from_name(NULL, "EC", "provider=default");
  } else if (p->type == TPM2_ALG_RSA) {
    UINT32 exponent = p->parameters.rsaDetail.exponent ? p->parameters.rsaDetail.exponent : 65537;
    n = BN_bin2bn(p->unique.rsa.buffer, p->unique.rsa.size, NULL);
    e = BN_new();
    if (n == NULL || e == NULL || !BN_set_word(e, exponent) ||
        !OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_N, n) ||
        !OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_E, e))
      goto out;
    ctx = EVP_PKEY_CTX_new_from_name(NULL, "RSA", "provider=default");
  } else {
    goto out;
  }
  params = OSSL_PARAM_BLD_to_param(bld);
  if (ctx == NULL || params == NULL || EVP_PKEY_fromdata_init(ctx) <= 0 ||
      EVP_PKEY_fromdata(ctx, &pkey, EVP_PKEY_PUBLIC_KEY, params) <= 0)
    pkey = NULL;
out:
  OSSL_PARAM_free(params);
  OSSL_PARAM_BLD_free(bld);
  EVP_PKEY_CTX_free(ctx);
  BN_free(n);
  BN_free(e);
  return pkey;
}

TSS2_RC edgekey_public_to_spki(const TPM2B_PUBLIC *pub, uint8_t **der, size_t *der_len) {
  if (pub == NULL || der == NULL || der_len == NULL) return EDGEKEY_RC_BAD_ARGUMENT;
  EVP_PKEY *pkey = edgekey_public_to_evp(pub);
  if (pkey == NULL) return EDGEKEY_RC_NOT_A_SIGNING_KEY;
  TSS2_RC rc = EDGEKEY_RC_MEMORY;
  unsigned char *buf = NULL;
  int len = i2d_PUBKEY(pkey, &buf);
  if (len > 0 && (*der = malloc((size_t)len)) != NULL) {
    memcpy(*der, buf, (size_t)len);
    *der_len = (size_t)len;
    rc = TSS2_RC_SUCCESS;
  }
  OPENSSL_free(buf);
  EVP_PKEY_free(pkey);
  return rc;
}

TSS2_RC edgekey_signature_encode(const TPMT_SIGNATURE *sig, uint8_t *out, size_t cap,
                                 size_t *len) {
  if (sig == NULL || out == NULL || len == NULL) return EDGEKEY_RC_BAD_ARGUMENT;
  switch (sig->sigAlg) {
  case TPM2_ALG_ECDSA: {
    TSS2_RC rc = EDGEKEY_RC_MEMORY;
    ECDSA_SIG *ecdsa = ECDSA_SIG_new();
    BIGNUM *r = BN_bin2bn(sig->signature.ecdsa.signatureR.buffer,
                          sig->signature.ecdsa.signatureR.size, NULL);
    BIGNUM *s = BN_bin2bn(sig->signature.ecdsa.signatureS.buffer,
                          sig->signature.ecdsa.signatureS.size, NULL);
    if (ecdsa == NULL || r == NULL || s == NULL || !ECDSA_SIG_set0(ecdsa, r, s)) {
      BN_free(r);
      BN_free(s);
      goto ecdsa_out;
    }
    int need = i2d_ECDSA_SIG(ecdsa, NULL);
    if (need <= 0 || (size_t)need > cap) {
      rc = EDGEKEY_RC_BAD_ARGUMENT;
      goto ecdsa_out;
    }
    unsigned char *p = out;
    *len = (size_t)i2d_ECDSA_SIG(ecdsa, &p);
    rc = TSS2_RC_SUCCESS;
  ecdsa_out:
    ECDSA_SIG_free(ecdsa);
    return rc;
  }
  case TPM2_ALG_RSASSA:
  case TPM2_ALG_RSAPSS: {
    const TPM2B_PUBLIC_KEY_RSA *rsa = &sig->signature.rsassa.sig;
    if (rsa->size > cap) return EDGEKEY_RC_BAD_ARGUMENT;
    memcpy(out, rsa->buffer, rsa->size);
    *len = rsa->size;
    return TSS2_RC_SUCCESS;
  }
  default:
    return EDGEKEY_RC_BAD_ARGUMENT;
  }
}

void edgekey_sha256(const uint8_t *data, size_t len, uint8_t out[32]) {
  unsigned int n = 32;
  EVP_Digest(data, len, out, &n, EVP_sha256(), NULL);
}
