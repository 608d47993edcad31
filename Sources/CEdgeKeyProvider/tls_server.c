/* Server SSL_CTX for the registration authority (and test peers): certificate chain + key,
 * client certificates requested and verified against given CAs. */
#include <stdio.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>

#include "edgekey_provider.h"
#include "edgekey_tls.h"
#include "internal.h"

/* A reason with OpenSSL's last error appended, and the queue cleared. */
#define why_printf(why, why_len, ...)                                                              \
  do {                                                                                             \
    edgekey_set_why(why, why_len, __VA_ARGS__);                                                    \
    edgekey_append_openssl_error(why, why_len);                                                    \
    ERR_clear_error();                                                                             \
  } while (0)

SSL_CTX *edgekey_tls_server_ctx(const edgekey_tls_server_config *cfg, char *why, size_t why_len) {
  if (why != NULL && why_len > 0) why[0] = '\0';
  ERR_clear_error();
  if (cfg == NULL || cfg->chain_pem == NULL || (cfg->key_pem == NULL) == (cfg->key == NULL)) {
    why_printf(why, why_len, "a certificate chain and one key (PEM or TPM) are required");
    return NULL;
  }
  SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
  EVP_PKEY *pkey = NULL;
  BIO *b = NULL;
  X509 *x = NULL;
  if (ctx == NULL) goto fail;
  int min = cfg->min_version ? cfg->min_version : TLS1_2_VERSION;
  int max = cfg->max_version ? cfg->max_version : TLS1_3_VERSION;
  if (!SSL_CTX_set_min_proto_version(ctx, min) || !SSL_CTX_set_max_proto_version(ctx, max))
    goto fail;
  if (!SSL_CTX_set_cipher_list(ctx, "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL")) goto fail;
  SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION |
                               SSL_OP_CIPHER_SERVER_PREFERENCE);

  b = BIO_new_mem_buf(cfg->chain_pem, -1);
  x = b ? PEM_read_bio_X509(b, NULL, NULL, NULL) : NULL;
  if (x == NULL || SSL_CTX_use_certificate(ctx, x) != 1) {
    why_printf(why, why_len, "the server certificate chain holds no PEM certificate");
    goto out_free;
  }
  X509_free(x);
  x = NULL;
  while ((x = PEM_read_bio_X509(b, NULL, NULL, NULL)) != NULL) {
    if (!SSL_CTX_add0_chain_cert(ctx, x)) goto fail;
    x = NULL;
  }
  ERR_clear_error();
  BIO_free(b);
  b = NULL;

  if (cfg->key_pem != NULL) {
    b = BIO_new_mem_buf(cfg->key_pem, -1);
    pkey = b ? PEM_read_bio_PrivateKey(b, NULL, NULL, NULL) : NULL;
    BIO_free(b); /* found leaking, once per server, by the AddressSanitizer pass */
    b = NULL;
  } else {
    pkey = edgekey_evp_pkey(cfg->key);
  }
  if (pkey == NULL) {
    why_printf(why, why_len, "the server key cannot be read");
    goto out_free;
  }
  if (SSL_CTX_use_PrivateKey(ctx, pkey) != 1 || SSL_CTX_check_private_key(ctx) != 1) {
    why_printf(why, why_len, "the server key does not match its certificate");
    goto out_free;
  }

  if (cfg->client_ca_pem != NULL) {
    X509_STORE *store = SSL_CTX_get_cert_store(ctx);
    STACK_OF(X509_NAME) *names = sk_X509_NAME_new_null();
    BIO *cb = BIO_new_mem_buf(cfg->client_ca_pem, -1);
    X509 *ca;
    int n = 0;
    while (cb != NULL && (ca = PEM_read_bio_X509(cb, NULL, NULL, NULL)) != NULL) {
      X509_STORE_add_cert(store, ca);
      X509_NAME *name = X509_NAME_dup(X509_get_subject_name(ca));
      if (names != NULL && name != NULL && !sk_X509_NAME_push(names, name)) X509_NAME_free(name);
      X509_free(ca);
      n++;
    }
    BIO_free(cb);
    ERR_clear_error();
    if (n == 0) {
      sk_X509_NAME_pop_free(names, X509_NAME_free);
      why_printf(why, why_len, "the client CA text holds no PEM certificate");
      goto out_free;
    }
    SSL_CTX_set_client_CA_list(ctx, names);
    X509_VERIFY_PARAM_set_purpose(SSL_CTX_get0_param(ctx), X509_PURPOSE_SSL_CLIENT);
    int mode = SSL_VERIFY_PEER;
    if (cfg->require_client_certificate) mode |= SSL_VERIFY_FAIL_IF_NO_PEER_CERT;
    SSL_CTX_set_verify(ctx, mode, NULL);
  }
  if (!SSL_CTX_set_session_id_context(ctx, (const unsigned char *)"edgekey", 7)) goto fail;
  EVP_PKEY_free(pkey);
  return ctx;

fail:
  why_printf(why, why_len, "OpenSSL refused a setting");
out_free:
  X509_free(x);
  BIO_free(b);
  EVP_PKEY_free(pkey);
  SSL_CTX_free(ctx);
  return NULL;
}



int edgekey_tls_unique(SSL *ssl, unsigned char *out, size_t cap) {
  /* The first Finished of the latest handshake is the client's on a full handshake and the
   * server's on an abbreviated (resumed) one. */
  int ours = SSL_is_server(ssl) ? SSL_session_reused(ssl) : !SSL_session_reused(ssl);
  size_t n = ours ? SSL_get_finished(ssl, out, cap) : SSL_get_peer_finished(ssl, out, cap);
  return n > cap ? -1 : (int)n;
}

STACK_OF(X509) *edgekey_tls_server_client_chain(SSL *ssl) {
  STACK_OF(X509) *verified = SSL_get0_verified_chain(ssl);
  if (verified != NULL && sk_X509_num(verified) > 0) return X509_chain_up_ref(verified);
  X509 *peer = SSL_get0_peer_certificate(ssl);
  if (peer == NULL || !SSL_session_reused(ssl) || SSL_get_verify_result(ssl) != X509_V_OK) return NULL;
  /* A resumed session keeps the client's certificate but not the chain it was verified with:
   * verify it again, now, against the same store. */
  STACK_OF(X509) *chain = NULL;
  X509_STORE_CTX *vc = X509_STORE_CTX_new();
  if (vc != NULL &&
      X509_STORE_CTX_init(vc, SSL_CTX_get_cert_store(SSL_get_SSL_CTX(ssl)), peer,
                          SSL_get_peer_cert_chain(ssl)) == 1 &&
      X509_STORE_CTX_set_purpose(vc, X509_PURPOSE_SSL_CLIENT) == 1 && X509_verify_cert(vc) == 1)
    chain = X509_STORE_CTX_get1_chain(vc);
  X509_STORE_CTX_free(vc);
  ERR_clear_error();
  return chain;
}
