/*
 * EdgeKey's OpenSSL 3 provider: a TPM-held key as an ordinary EVP_PKEY.
 *
 * The provider is built into the library (no module file to install) and registered in the
 * default library context beside OpenSSL's default provider, so any SSL_CTX, libcurl or
 * libmosquitto uses the key unchanged. Signing is the only TPM operation: one TPM2_Sign over
 * a digest computed in software. Digests, verification, randomness and ciphers stay with the
 * default provider.
 */
#ifndef EDGEKEY_PROVIDER_H
#define EDGEKEY_PROVIDER_H

#include <openssl/evp.h>

#include "edgekey.h"

#ifdef __cplusplus
extern "C" {
#endif

#define EDGEKEY_VERSION "0.3.0"

/*
 * Registers and activates the provider (once per process; later calls are free). Returns 1 on
 * success.
 *
 * The provider lives in a library context of its own (with OpenSSL's default provider beside
 * it), not in the application's default context, whose providers, default properties and
 * FIPS setting are left as they were: our keymgmt answers to "EC" and "RSA", and in the
 * default context OpenSSL 3.0's method cache would let unrelated fetches of "EC" land on it.
 * EVP_PKEYs made by edgekey_evp_pkey() work in any context (SSL_CTX_new, EVP_DigestSign...).
 */
int edgekey_provider_load(void);

/* The provider's library context (NULL if it could not be loaded). For tests and tools that
 * fetch the provider's algorithms by name; keys come from edgekey_evp_pkey(). */
OSSL_LIB_CTX *edgekey_provider_libctx(void);

/*
 * The key as an EVP_PKEY of the provider. The EVP_PKEY holds its own reference to `key`, so
 * the caller may free `key` afterwards. Sign with it through any EVP or libssl API; its
 * private half cannot be exported. Returns NULL for a key type OpenSSL cannot use.
 */
EVP_PKEY *edgekey_evp_pkey(edgekey_tpm_key *key);

/* 1 when `pkey` belongs to EdgeKey's provider (its private half is in a TPM). */
int edgekey_evp_pkey_is_tpm(const EVP_PKEY *pkey);

#ifdef __cplusplus
}
#endif
#endif
