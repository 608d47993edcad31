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
 * Registers and activates the provider in the default library context (once per process;
 * later calls are free). Returns 1 on success.
 *
 * It also sets the default property query to "?provider=default" (keeping fips=yes if FIPS
 * mode was on): our keymgmt answers to "EC" and "RSA", and without that preference an
 * unqualified fetch elsewhere in the process (a software key generation, say) could land on
 * it. Set EDGEKEY_KEEP_DEFAULT_PROPERTIES in the environment to leave the query alone.
 */
int edgekey_provider_load(void);

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
