/*
 * EdgeKey TLS client contexts: a certificate chain plus a TPM-held key, and the peer policy
 * of mutual TLS, as one SSL_CTX that libssl, libmosquitto (MOSQ_OPT_SSL_CTX) and libcurl
 * (CURLOPT_SSL_CTX_FUNCTION) use unchanged. The same code serves the Swift library and C
 * daemons.
 */
#ifndef EDGEKEY_TLS_H
#define EDGEKEY_TLS_H

#include <openssl/ssl.h>

#include "edgekey.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  const char *chain_pem;   /* our certificate first, then intermediates (PEM text) */
  edgekey_tpm_key *key;    /* the TPM key the certificate is for (borrowed; the ctx refs it) */
  EVP_PKEY *software_key;  /* instead of `key`: a software key (benchmark floor, development) */
  const char *trust_pem;   /* the CA certificates we trust for servers (PEM text), required */
  const char *crl_pem;     /* CRLs to check the server's certificate against, or NULL */
  const char *server_name; /* host name or IP literal the server's certificate must name */
  int min_version;         /* TLS1_2_VERSION when 0 */
  int max_version;         /* TLS1_3_VERSION when 0 */
  int allow_missing_server_auth_eku; /* 1: a server certificate with no EKU at all is accepted
                                      * (RFC 5280: unrestricted); 0: it must name serverAuth */
  int allow_unverified_name;         /* 0: server_name is required */
  int accept_cmc_ra;  /* 1: id-kp-cmcRA stands in for serverAuth (EST servers, RFC 7030 3.6.1) */
  int crl_missing_ok; /* with crl_pem, every certificate of the server's chain is checked against
                       * its issuer's CRL; 0: a level with no CRL fails the handshake
                       * (X509_V_ERR_UNABLE_TO_GET_CRL), 1: it passes unchecked */
  const char *alpn;   /* ALPN protocols to offer, comma-separated ("x-amzn-mqtt-ca"), or NULL */
  int resume_sessions;     /* edgekey_tls_client_ctx only: 1 resumes sessions (see below) */
  long session_max_age_ms; /* a kept session is offered for at most this long (0: 1 hour) */
} edgekey_tls_config;

/* Why a context could not be made; the first few concern our own certificate. */
typedef enum {
  EDGEKEY_TLS_OK = 0,
  EDGEKEY_TLS_BAD_CHAIN,         /* no certificate, or not PEM */
  EDGEKEY_TLS_CERT_EXPIRED,      /* our certificate's notAfter has passed */
  EDGEKEY_TLS_CERT_NOT_YET_VALID,
  EDGEKEY_TLS_CERT_NO_CLIENT_AUTH, /* EKU present without clientAuth */
  EDGEKEY_TLS_CERT_KEY_MISMATCH,   /* the certificate is for another key */
  EDGEKEY_TLS_BAD_TRUST,           /* no trust anchors, or not PEM */
  EDGEKEY_TLS_BAD_CRL,
  EDGEKEY_TLS_NO_SERVER_NAME,
  EDGEKEY_TLS_BAD_KEY,  /* the TPM key cannot be used by OpenSSL */
  EDGEKEY_TLS_INTERNAL, /* OpenSSL refused a setting; `why` has its error */
} edgekey_tls_status;

/*
 * A client SSL_CTX: TLS 1.2 minimum, forward-secret AEAD suites only, client signature
 * algorithms limited to what the key signs, the server verified against `trust_pem` only (not
 * the system store), its name checked, serverAuth EKU required, CRLs checked when given.
 * Our certificate is checked first (dates, clientAuth, matches the key); `why` says what is
 * wrong. Returns NULL with a status other than OK on failure.
 */
SSL_CTX *edgekey_tls_client_ctx(const edgekey_tls_config *config, edgekey_tls_status *status,
                                char *why, size_t why_len);

/*
 * SNI (RFC 6066 3): every connection from a context of ours sends the name it verifies when that
 * is a DNS name, and no server_name extension at all when it is an IP address (literal IPs are
 * not permitted in SNI), whatever the library driving the SSL set (libmosquitto sets its host).
 */

/*
 * Session resumption (contexts of edgekey_tls_client_ctx with resume_sessions): the session
 * tickets a server sends are kept in memory, in the context, per endpoint ("host:port"), at most
 * 4 per endpoint and 16 per context, and never written anywhere. A connection to an endpoint
 * offers the newest one it has: a TLS 1.3 ticket is taken out (used once, RFC 8446 C.4), a
 * TLS 1.2 session stays (RFC 5077). A resumed handshake sends no certificate and so costs no
 * TPM command. A session is offered
 * only while it is younger than session_max_age_ms and the server's lifetime hint, and while
 * the server's certificate and ours are within their dates. A new identity, trust anchor or
 * CRL is a new context: its cache starts empty, so nothing resumed outlives what verified it.
 * A server that does not accept the ticket completes a full handshake instead.
 *
 * The endpoint comes from edgekey_tls_set_endpoint for an SSL the caller made, or from the
 * calling thread's endpoint scope for an SSL made inside another library (libmosquitto): the
 * handshake's first step runs on the thread that entered the scope, and the SSL keeps the
 * endpoint from then on. Without an endpoint nothing is kept or offered.
 */
int edgekey_tls_set_endpoint(SSL *ssl, const char *endpoint);
void edgekey_tls_endpoint_scope_enter(SSL_CTX *ctx, const char *endpoint);
void edgekey_tls_endpoint_scope_leave(void);
/* Drops every kept session of `ctx`; returns how many there were. */
int edgekey_tls_forget_sessions(SSL_CTX *ctx);
/* How many sessions `ctx` keeps (for all endpoints). */
int edgekey_tls_kept_sessions(SSL_CTX *ctx);

/*
 * Sockets without SIGPIPE. OpenSSL's socket BIO writes with write(2), which raises SIGPIPE when
 * the peer has closed: the process dies unless it ignores the signal. These BIOs write with
 * send(MSG_NOSIGNAL), so a closed peer is an EPIPE error on that connection whatever the
 * process's disposition, and EdgeKey's library code never changes it.
 *
 * edgekey_ssl_set_socket: as SSL_set_fd, with such a BIO (the fd is never closed by it).
 * edgekey_ssl_adopt_socket: replaces the plain socket BIO of an SSL that another library made
 *   (libmosquitto's) by one for the same fd; returns 1 when it did. Connections from contexts
 *   of edgekey_tls_client_ctx get it before their ClientHello.
 */
BIO *edgekey_bio_new_socket(int fd);
int edgekey_ssl_set_socket(SSL *ssl, int fd);
int edgekey_ssl_adopt_socket(SSL *ssl);
/* 1 when `ssl` writes through such a BIO. */
int edgekey_ssl_writes_nosignal(const SSL *ssl);

/*
 * The same policy applied to a context made elsewhere (libcurl's, in its
 * CURLOPT_SSL_CTX_FUNCTION): its certificate store is replaced by `trust_pem`. Here the client
 * identity is optional: with no chain and no key, no client certificate is offered (EST
 * enrollment authenticated by a password). Returns 1 on success, else 0 with `status` and `why`.
 */
int edgekey_tls_configure(SSL_CTX *ctx, const edgekey_tls_config *config, edgekey_tls_status *status,
                          char *why, size_t why_len);

/* What a failed handshake or read/write reports, by layer. */
typedef enum {
  EDGEKEY_LAYER_NONE = 0,
  EDGEKEY_LAYER_NETWORK,            /* connection refused, reset, closed, timed out */
  EDGEKEY_LAYER_PROTOCOL,           /* version or cipher suites not agreed */
  EDGEKEY_LAYER_SERVER_CERTIFICATE, /* we did not accept the server's certificate */
  EDGEKEY_LAYER_CLIENT_CERTIFICATE, /* the server did not accept ours */
  EDGEKEY_LAYER_TPM,                /* the TPM did not sign */
  EDGEKEY_LAYER_TLS,                /* anything else libssl reported */
} edgekey_tls_layer;

typedef struct {
  edgekey_tls_layer layer;
  long verify_error; /* X509_V_ERR_* for the server's certificate, else 0 */
  int depth;         /* chain depth of the certificate at fault (0 = leaf), -1 if none */
  int alert;         /* TLS alert the server sent, or -1 */
  char subject[256]; /* the certificate at fault (the server's, or ours) */
  char issuer[256];
  char not_before[40];
  char not_after[40];
  char reason[512];
  /* 1 when the evidence fits a refusal of our certificate and a plain network failure alike
   * (TLS 1.3: the connection ended after our Certificate with no alert and no session ticket);
   * reported at the network layer, as transient. */
  int ambiguous;
} edgekey_tls_failure;

/* How the last connection made from a context ended, whether it failed or not: for telling
 * "the server accepted our certificate and then closed" (a broker that does not speak the MQTT
 * version we asked for) from a refusal. */
typedef struct {
  int handshake_done;  /* the TLS handshake completed on our side */
  int version;         /* TLS1_2_VERSION, TLS1_3_VERSION, or 0 */
  int ticket_received; /* TLS 1.3: the server sent a session ticket, so it accepted our certificate */
  int alert;           /* the first alert the server sent, or -1 */
  int cert_sent;       /* we sent a non-empty Certificate */
  int resumed;         /* the handshake resumed a kept session (no certificate, no signature) */
} edgekey_tls_connection_info;

/* The last connection from `ctx` whose SSL was freed; returns 0 when there is none since the
 * last call (each call clears it). */
int edgekey_tls_last_connection(SSL_CTX *ctx, edgekey_tls_connection_info *out);
/* The same for a connection whose SSL is still there; returns 0 when it recorded nothing. */
int edgekey_tls_connection_of(SSL *ssl, edgekey_tls_connection_info *out);

/* 1 once our ClientHello has been written to the socket (for code that drives a handshake
 * from its own event loop: before that, only a writable socket makes progress). */
int edgekey_tls_client_hello_sent(SSL *ssl);

/* The ALPN protocol the server selected on `ssl` into `out` (NUL-terminated); 0 when none. */
int edgekey_tls_alpn_selected(const SSL *ssl, char *out, size_t cap);

/*
 * Explains why SSL_connect/SSL_read/SSL_write on `ssl` (made from a context of
 * edgekey_tls_client_ctx) failed with `ssl_error` (SSL_get_error()). Consumes the thread's
 * OpenSSL error queue. Returns the layer.
 */
edgekey_tls_layer edgekey_tls_diagnose(SSL *ssl, int ssl_error, edgekey_tls_failure *out);

/*
 * The last connection made from `ctx` that failed on a certificate (ours refused by the
 * server's alert, or the server's refused by us), explained after its SSL was freed: for
 * libraries that free the SSL before reporting the failure. Returns EDGEKEY_LAYER_NONE when
 * there is none since the last call; each call clears it.
 */
edgekey_tls_layer edgekey_tls_last_failure(SSL_CTX *ctx, edgekey_tls_failure *out);

/* ---- Servers: the registration authority, and test peers ----------------------------------- */

typedef struct {
  const char *chain_pem;    /* the server's certificate first, then intermediates */
  const char *key_pem;      /* its private key (PEM), or NULL with `key` */
  edgekey_tpm_key *key;     /* a TPM-held key instead (a factory station's own TPM) */
  const char *client_ca_pem; /* CAs whose client certificates are verified; NULL asks for none */
  int require_client_certificate; /* 0: a client may come without one (password enrollment) */
  int min_version, max_version;   /* TLS 1.2 and 1.3 when 0 */
} edgekey_tls_server_config;

/* A server SSL_CTX, or NULL with `why`. A client certificate that fails verification ends the
 * handshake with an alert the client can explain. */
SSL_CTX *edgekey_tls_server_ctx(const edgekey_tls_server_config *config, char *why, size_t why_len);

/* The tls-unique channel binding (RFC 5929 3.1) of `ssl`, client or server: the first Finished
 * message of the latest handshake (the client's on a full handshake, the server's on a resumed
 * one). Returns its length, or -1 when `cap` is too small. */
int edgekey_tls_unique(SSL *ssl, unsigned char *out, size_t cap);

/* The client certificate chain a server verified, leaf first, as a new stack the caller frees
 * with sk_X509_pop_free; on a resumed session (where OpenSSL keeps only the client's
 * certificate) that certificate verified again, now, against the context's store. NULL: no
 * verified client certificate. */
STACK_OF(X509) *edgekey_tls_server_client_chain(SSL *ssl);

#ifdef __cplusplus
}
#endif
#endif
