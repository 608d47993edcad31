/* Client SSL_CTX for mutual TLS with a TPM-held key, and handshake failure diagnosis. */
#include <arpa/inet.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>

#include "edgekey_provider.h"
#include "edgekey_tls.h"
#include "internal.h"

/* ---- Per-connection record of what went wrong, kept in the SSL's ex_data ------------------- */

typedef struct {
  long verify_error;
  int depth;
  int alert_received;
  char subject[256], issuer[256], not_before[40], not_after[40];
  /* Filled when the record outlives its SSL (see keep_last_failure). */
  char own_subject[256], own_issuer[256], own_not_before[40], own_not_after[40];
  char expected_name[256];
  /* TLS 1.3 moves the client certificate after the client's Finished: a server that refuses
   * it sends an alert and closes, and if our first MQTT packet is already on its way the close
   * becomes a reset that can overtake the alert. These say what happened before the end. */
  int tls13_cert_sent; /* we sent a non-empty Certificate message in TLS 1.3 (the server's
                        * Finished already checked: only our certificate is left to judge) */
  int ticket_received; /* the server sent a NewSessionTicket: it accepted our certificate */
  int handshake_done;
  int version;
  int hello_sent; /* our ClientHello is written to the socket (msg_callback runs after the write) */
  /* We sent a non-empty Certificate but never the CertificateVerify after it: signing with our
   * key failed (the TPM is gone, reset mid-command, or refused), whatever the server did next. */
  int cert_sent;
  int cert_verify_sent;
  char sign_failure[256]; /* the provider's reason, when known */
  char endpoint[272];     /* "host:port", for session resumption; "" when unknown */
  int resumed;            /* the handshake resumed a kept session */
} failure_record;

/* One kept session: a ticket the server sent on a connection to `endpoint`. */
typedef struct {
  char endpoint[272];
  SSL_SESSION *session;
  long long stored_ms; /* CLOCK_MONOTONIC: a clock step neither ages nor rejuvenates it */
} kept_session;

#define KEPT_PER_CONTEXT 16
#define KEPT_PER_ENDPOINT 4

typedef struct {
  int require_server_auth_eku;
  int accept_cmc_ra;
  int crl_missing_ok;
  /* The SNI every connection sends: the verified name when it is a DNS name; "" for none. */
  char sni[256];
  /* The last failed connection of this context, kept after its SSL is freed: libraries that
   * free the SSL before telling us (libmosquitto 2.0 on a lost connection) still get a reason. */
  pthread_mutex_t lock;
  int has_last;
  failure_record last;
  int has_last_connection;
  failure_record last_connection;
  /* Session resumption (edgekey_tls_client_ctx only); `kept` is guarded by `lock`. */
  int resume;
  long long max_age_ms;
  kept_session kept[KEPT_PER_CONTEXT];
} ctx_policy;

static int ssl_index = -1;
static int ctx_index = -1;
static pthread_once_t index_once = PTHREAD_ONCE_INIT;

static void describe_cert(X509 *cert, char *subject, char *issuer, char *nb, char *na);

static int signing_failed(const failure_record *r) { return r->cert_sent && !r->cert_verify_sent; }

/* Runs inside SSL_free, while the SSL and its context are still whole. */
static int probably_refused(const failure_record *r) {
  return r->verify_error == 0 && r->alert_received < 0 && r->tls13_cert_sent && !r->ticket_received &&
         !signing_failed(r);
}

/* What the TPM layer says about a handshake whose signature was never made. */
static void signing_failure(const failure_record *r, const char *queued, edgekey_tls_failure *out) {
  out->layer = EDGEKEY_LAYER_TPM;
  const char *why = queued != NULL && queued[0] ? queued
                    : r != NULL && r->sign_failure[0] ? r->sign_failure
                    : edgekey_provider_thread_error()[0] ? edgekey_provider_thread_error()
                                                         : "no reason recorded";
  snprintf(out->reason, sizeof(out->reason), "the TPM did not sign: %s", why);
}

static void keep_last_failure(SSL *ssl, failure_record *r) {
  if (ssl == NULL || r == NULL) return;
  ctx_policy *any = SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), ctx_index);
  if (any != NULL) {
    pthread_mutex_lock(&any->lock);
    any->last_connection = *r;
    any->has_last_connection = 1;
    pthread_mutex_unlock(&any->lock);
  }
  if (r->verify_error == 0 && r->alert_received <= 0 && !probably_refused(r) && !signing_failed(r))
    return;
  if (signing_failed(r) && r->sign_failure[0] == '\0')
    snprintf(r->sign_failure, sizeof(r->sign_failure), "%s", edgekey_provider_thread_error());
  /* SSL_free has already freed the SSL's verify parameters: only the context is used here. */
  ctx_policy *policy = SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), ctx_index);
  if (policy == NULL) return;
  pthread_mutex_lock(&policy->lock);
  policy->last = *r;
  policy->has_last = 1;
  pthread_mutex_unlock(&policy->lock);
}

static void free_record(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl,
                        void *argp) {
  (void)ad, (void)argl, (void)argp;
  if (ptr != NULL && idx == ssl_index) keep_last_failure(parent, ptr);
  free(ptr);
}

static void free_policy(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl,
                        void *argp) {
  (void)parent, (void)ad, (void)idx, (void)argl, (void)argp;
  ctx_policy *policy = ptr;
  if (policy == NULL) return;
  for (int i = 0; i < KEPT_PER_CONTEXT; i++) SSL_SESSION_free(policy->kept[i].session);
  pthread_mutex_destroy(&policy->lock);
  free(policy);
}

static void make_indexes(void) {
  ssl_index = SSL_get_ex_new_index(0, "edgekey failure", NULL, NULL, free_record);
  ctx_index = SSL_CTX_get_ex_new_index(0, "edgekey policy", NULL, NULL, free_policy);
}

static failure_record *record_for(SSL *ssl, int create) {
  failure_record *r = SSL_get_ex_data(ssl, ssl_index);
  if (r == NULL && create) {
    r = calloc(1, sizeof(*r));
    if (r == NULL) return NULL;
    r->depth = -1;
    r->alert_received = -1;
    SSL_set_ex_data(ssl, ssl_index, r);
  }
  return r;
}

static void print_name(const X509_NAME *name, char *out, size_t cap) {
  out[0] = '\0';
  BIO *b = BIO_new(BIO_s_mem());
  if (b == NULL) return;
  X509_NAME_print_ex(b, name, 0, XN_FLAG_RFC2253 & ~ASN1_STRFLGS_ESC_MSB);
  int n = BIO_read(b, out, (int)cap - 1);
  out[n > 0 ? n : 0] = '\0';
  BIO_free(b);
}

/* ISO 8601 in UTC, as the Swift side prints dates. */
static void print_time(const ASN1_TIME *t, char *out, size_t cap) {
  struct tm tm;
  out[0] = '\0';
  if (t == NULL || ASN1_TIME_to_tm(t, &tm) != 1) return;
  strftime(out, cap, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

static void describe_cert(X509 *cert, char *subject, char *issuer, char *nb, char *na) {
  if (cert == NULL) return;
  print_name(X509_get_subject_name(cert), subject, 256);
  print_name(X509_get_issuer_name(cert), issuer, 256);
  print_time(X509_get0_notBefore(cert), nb, 40);
  print_time(X509_get0_notAfter(cert), na, 40);
}

/* The certificate's EKU names id-kp-cmcRA (1.3.6.1.5.5.7.3.28). */
static int has_cmc_ra(X509 *cert) {
  EXTENDED_KEY_USAGE *eku = X509_get_ext_d2i(cert, NID_ext_key_usage, NULL, NULL);
  int found = 0;
  for (int i = 0; eku != NULL && i < sk_ASN1_OBJECT_num(eku); i++)
    found |= OBJ_obj2nid(sk_ASN1_OBJECT_value(eku, i)) == NID_cmcRA;
  EXTENDED_KEY_USAGE_free(eku);
  return found;
}

static int verify_callback(int ok, X509_STORE_CTX *store) {
  SSL *ssl = X509_STORE_CTX_get_ex_data(store, SSL_get_ex_data_X509_STORE_CTX_idx());
  int depth = X509_STORE_CTX_get_error_depth(store);
  X509 *cert = X509_STORE_CTX_get_current_cert(store);
  ctx_policy *policy = ssl != NULL ? SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), ctx_index) : NULL;
  int error = X509_STORE_CTX_get_error(store);
  if (!ok && policy != NULL && error == X509_V_ERR_UNABLE_TO_GET_CRL && policy->crl_missing_ok) {
    /* A level of the chain whose issuer published no CRL we have: allowed by policy. */
    X509_STORE_CTX_set_error(store, X509_V_OK);
    ok = 1;
  }
  if (!ok && policy != NULL && depth == 0 && error == X509_V_ERR_INVALID_PURPOSE &&
      policy->accept_cmc_ra && has_cmc_ra(cert)) {
    /* OpenSSL's SSL-server purpose knows only serverAuth; RFC 7030 3.6.1 lets an EST server
     * show id-kp-cmcRA instead. */
    X509_STORE_CTX_set_error(store, X509_V_OK);
    ok = 1;
  }
  if (ok && depth == 0 && policy != NULL) {
    int has_eku = (X509_get_extension_flags(cert) & EXFLAG_XKUSAGE) != 0;
    int server_auth = has_eku && ((X509_get_extended_key_usage(cert) & XKU_SSL_SERVER) ||
                                  (policy->accept_cmc_ra && has_cmc_ra(cert)));
    if (policy->require_server_auth_eku && !server_auth) {
      X509_STORE_CTX_set_error(store, X509_V_ERR_INVALID_PURPOSE);
      ok = 0;
    }
  }
  if (!ok && ssl != NULL) {
    failure_record *r = record_for(ssl, 1);
    if (r != NULL && r->verify_error == 0) {
      r->verify_error = X509_STORE_CTX_get_error(store);
      r->depth = depth;
      describe_cert(cert, r->subject, r->issuer, r->not_before, r->not_after);
      X509_VERIFY_PARAM *param = SSL_get0_param(ssl);
      char *host = param != NULL ? X509_VERIFY_PARAM_get0_host(param, 0) : NULL;
      char *ip = param != NULL ? X509_VERIFY_PARAM_get1_ip_asc(param) : NULL;
      snprintf(r->expected_name, sizeof(r->expected_name), "%s", host ? host : ip ? ip : "?");
      OPENSSL_free(ip);
    }
  }
  return ok;
}

static void msg_callback(int write_p, int version, int content_type, const void *buf, size_t len,
                         SSL *ssl, void *arg) {
  (void)arg;
  const unsigned char *p = buf;
  if (content_type != SSL3_RT_HANDSHAKE || len < 1 || SSL_is_server(ssl)) return;
  if (write_p && p[0] == SSL3_MT_CLIENT_HELLO) {
    edgekey_provider_thread_error_clear(); /* a new handshake: older errors are not its own */
    failure_record *r = record_for(ssl, 1);
    if (r != NULL) r->hello_sent = 1;
  } else if (write_p && p[0] == SSL3_MT_CERTIFICATE_VERIFY) {
    failure_record *r = record_for(ssl, 1);
    if (r != NULL) r->cert_verify_sent = 1;
  }
  if (write_p && p[0] == SSL3_MT_CERTIFICATE && len > (version == TLS1_3_VERSION ? 8u : 7u)) {
    /* More than the empty list (type, length, [TLS 1.3 context,] list length). */
    failure_record *r = record_for(ssl, 1);
    if (r != NULL) {
      r->cert_sent = 1;
      r->tls13_cert_sent = version == TLS1_3_VERSION;
      describe_cert(SSL_get_certificate(ssl), r->own_subject, r->own_issuer, r->own_not_before,
                    r->own_not_after);
    }
  } else if (!write_p && p[0] == SSL3_MT_NEWSESSION_TICKET) {
    failure_record *r = record_for(ssl, 1);
    if (r != NULL) r->ticket_received = 1;
  }
}

/* ---- Session resumption ------------------------------------------------------------------- */

/* The endpoint a thread is connecting to, for SSLs made inside another library. */
static _Thread_local struct {
  SSL_CTX *ctx;
  char endpoint[272];
} endpoint_scope;

static long long monotonic_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void drop_kept(kept_session *k) {
  SSL_SESSION_free(k->session);
  memset(k, 0, sizeof(*k));
}

/* Whether `k` may still be offered: young enough, and both certificates within their dates. */
static int still_usable(const ctx_policy *policy, SSL_CTX *ctx, const kept_session *k, long long now) {
  if (!SSL_SESSION_is_resumable(k->session)) return 0;
  long long age = now - k->stored_ms;
  unsigned long hint = SSL_SESSION_get_ticket_lifetime_hint(k->session);
  if (age >= policy->max_age_ms || (hint > 0 && age >= (long long)hint * 1000)) return 0;
  X509 *peer = SSL_SESSION_get0_peer(k->session);
  X509 *own = SSL_CTX_get0_certificate(ctx);
  if (peer == NULL || X509_cmp_current_time(X509_get0_notAfter(peer)) <= 0) return 0;
  if (own != NULL && X509_cmp_current_time(X509_get0_notAfter(own)) <= 0) return 0;
  return 1;
}

/* Before the ClientHello: the newest usable session kept for this endpoint. A TLS 1.3 ticket is
 * taken out (used once, RFC 8446 C.4; the server sends a fresh one on every connection); a
 * TLS 1.2 session stays (RFC 5077 tickets are reused, and OpenSSL reports no renewed ticket on
 * a resumed TLS 1.2 handshake). */
static void offer_kept_session(SSL *ssl, ctx_policy *policy) {
  failure_record *r = record_for(ssl, 1);
  SSL_CTX *ctx = SSL_get_SSL_CTX(ssl);
  if (r == NULL) return;
  if (r->endpoint[0] == '\0' && endpoint_scope.ctx == ctx)
    memcpy(r->endpoint, endpoint_scope.endpoint, sizeof(r->endpoint));
  if (r->endpoint[0] == '\0') return;
  SSL_SESSION *chosen = NULL;
  long long now = monotonic_ms(), newest = -1;
  int at = -1;
  pthread_mutex_lock(&policy->lock);
  for (int i = 0; i < KEPT_PER_CONTEXT; i++) {
    kept_session *k = &policy->kept[i];
    if (k->session == NULL) continue;
    if (!still_usable(policy, ctx, k, now)) {
      drop_kept(k);
      continue;
    }
    if (strcmp(k->endpoint, r->endpoint) == 0 && k->stored_ms > newest) {
      newest = k->stored_ms;
      at = i;
    }
  }
  if (at >= 0) {
    chosen = policy->kept[at].session;
    if (SSL_SESSION_get_protocol_version(chosen) == TLS1_3_VERSION) {
      policy->kept[at].session = NULL;
      drop_kept(&policy->kept[at]);
    } else {
      SSL_SESSION_up_ref(chosen);
    }
  }
  pthread_mutex_unlock(&policy->lock);
  if (chosen != NULL) {
    SSL_set_session(ssl, chosen);
    SSL_SESSION_free(chosen);
  }
}

/* OpenSSL's new-session callback (client): keeps a copy of the ticket for the connection's
 * endpoint, and returns 0 (OpenSSL keeps its reference). A copy, because the session handed
 * over may be the live connection's own, which OpenSSL marks not resumable when that
 * connection ends without a close_notify (a reset): exactly when it would be needed. */
static int keep_session(SSL *ssl, SSL_SESSION *handed) {
  ctx_policy *policy = SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), ctx_index);
  failure_record *r = record_for(ssl, 0);
  if (policy == NULL || !policy->resume || r == NULL || r->endpoint[0] == '\0' ||
      !SSL_SESSION_is_resumable(handed) || SSL_get_verify_result(ssl) != X509_V_OK)
    return 0;
  SSL_SESSION *session = SSL_SESSION_dup(handed);
  if (session == NULL) return 0;
  long long now = monotonic_ms();
  int tls12 = SSL_SESSION_get_protocol_version(session) != TLS1_3_VERSION;
  pthread_mutex_lock(&policy->lock);
  int same = 0, free_slot = -1, oldest_same = -1, oldest = -1;
  for (int i = 0; i < KEPT_PER_CONTEXT; i++) {
    kept_session *k = &policy->kept[i];
    if (tls12 && k->session != NULL && strcmp(k->endpoint, r->endpoint) == 0 &&
        SSL_SESSION_get_protocol_version(k->session) != TLS1_3_VERSION)
      drop_kept(k); /* a full TLS 1.2 handshake: the session it replaces was refused or aged */
    if (k->session == NULL) {
      if (free_slot < 0) free_slot = i;
      continue;
    }
    if (oldest < 0 || k->stored_ms < policy->kept[oldest].stored_ms) oldest = i;
    if (strcmp(k->endpoint, r->endpoint) == 0) {
      same++;
      if (oldest_same < 0 || k->stored_ms < policy->kept[oldest_same].stored_ms) oldest_same = i;
    }
  }
  int at = same >= KEPT_PER_ENDPOINT ? oldest_same : free_slot >= 0 ? free_slot : oldest;
  drop_kept(&policy->kept[at]);
  memcpy(policy->kept[at].endpoint, r->endpoint, sizeof(r->endpoint));
  policy->kept[at].session = session;
  policy->kept[at].stored_ms = now;
  pthread_mutex_unlock(&policy->lock);
  return 0;
}

int edgekey_tls_set_endpoint(SSL *ssl, const char *endpoint) {
  pthread_once(&index_once, make_indexes);
  failure_record *r = ssl != NULL ? record_for(ssl, 1) : NULL;
  if (r == NULL || endpoint == NULL || strlen(endpoint) >= sizeof(r->endpoint)) return 0;
  snprintf(r->endpoint, sizeof(r->endpoint), "%s", endpoint);
  return 1;
}

void edgekey_tls_endpoint_scope_enter(SSL_CTX *ctx, const char *endpoint) {
  endpoint_scope.ctx = NULL;
  if (endpoint == NULL || strlen(endpoint) >= sizeof(endpoint_scope.endpoint)) return;
  snprintf(endpoint_scope.endpoint, sizeof(endpoint_scope.endpoint), "%s", endpoint);
  endpoint_scope.ctx = ctx;
}

void edgekey_tls_endpoint_scope_leave(void) {
  endpoint_scope.ctx = NULL;
  endpoint_scope.endpoint[0] = '\0';
}

static int kept_sessions(SSL_CTX *ctx, int forget) {
  pthread_once(&index_once, make_indexes);
  ctx_policy *policy = ctx != NULL ? SSL_CTX_get_ex_data(ctx, ctx_index) : NULL;
  if (policy == NULL) return 0;
  int n = 0;
  pthread_mutex_lock(&policy->lock);
  for (int i = 0; i < KEPT_PER_CONTEXT; i++) {
    if (policy->kept[i].session == NULL) continue;
    n++;
    if (forget) drop_kept(&policy->kept[i]);
  }
  pthread_mutex_unlock(&policy->lock);
  return n;
}

int edgekey_tls_forget_sessions(SSL_CTX *ctx) { return kept_sessions(ctx, 1); }
int edgekey_tls_kept_sessions(SSL_CTX *ctx) { return kept_sessions(ctx, 0); }

static void info_callback(const SSL *ssl, int where, int ret) {
  if ((where & SSL_CB_HANDSHAKE_START) && !SSL_is_server(ssl) && SSL_in_before(ssl)) {
    /* Before the ClientHello is written: the SNI is ours to choose, not the caller's. */
    ctx_policy *policy = SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), ctx_index);
    if (policy != NULL) {
      const char *sni = policy->sni[0] != '\0' ? policy->sni : NULL;
      SSL_set_tlsext_host_name((SSL *)ssl, sni);
      if (policy->resume) offer_kept_session((SSL *)ssl, policy);
      /* Before anything is written: no write of this connection can raise SIGPIPE. */
      edgekey_ssl_adopt_socket((SSL *)ssl);
    }
  }
  if (where & SSL_CB_HANDSHAKE_DONE) {
    failure_record *r = record_for((SSL *)ssl, 1);
    if (r != NULL) {
      r->handshake_done = 1;
      r->version = SSL_version(ssl);
      r->resumed = SSL_session_reused((SSL *)ssl);
      }
  }

  if ((where & SSL_CB_ALERT) && (where & SSL_CB_READ)) {
    failure_record *r = record_for((SSL *)ssl, 1);
    /* close_notify (0) is not a failure; keep the first real alert. */
    if (r != NULL && (ret & 0xff) != 0 && r->alert_received < 0) {
      r->alert_received = ret & 0xff;
      describe_cert(SSL_get_certificate(ssl), r->own_subject, r->own_issuer, r->own_not_before,
                    r->own_not_after);
    }
  }
}

/* ---- Building the context ------------------------------------------------------------------ */

void edgekey_set_why(char *why, size_t why_len, const char *fmt, ...) {
  if (why == NULL || why_len == 0) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(why, why_len, fmt, ap);
  va_end(ap);
}

void edgekey_append_openssl_error(char *why, size_t why_len) {
  unsigned long e = ERR_peek_last_error();
  if (e == 0 || why == NULL) return;
  size_t used = strnlen(why, why_len);
  char buf[256];
  ERR_error_string_n(e, buf, sizeof(buf));
  if (used + 3 < why_len) snprintf(why + used, why_len - used, ": %s", buf);
}

static STACK_OF(X509) *read_certs(const char *pem) {
  STACK_OF(X509) *certs = sk_X509_new_null();
  BIO *b = BIO_new_mem_buf(pem, -1);
  X509 *x;
  while (certs != NULL && b != NULL && (x = PEM_read_bio_X509(b, NULL, NULL, NULL)) != NULL) {
    if (!sk_X509_push(certs, x)) X509_free(x);
  }
  BIO_free(b);
  ERR_clear_error(); /* the loop ends on "no start line" */
  return certs;
}

static const char *client_sigalgs(EVP_PKEY *pkey) {
  if (EVP_PKEY_is_a(pkey, "EC")) {
    /* TLS 1.3 ties the hash to the curve; TLS 1.2 takes any. */
    return EVP_PKEY_get_bits(pkey) == 384 ? "ECDSA+SHA384:ECDSA+SHA256" : "ECDSA+SHA256:ECDSA+SHA384";
  }
  return "rsa_pss_rsae_sha256:rsa_pss_rsae_sha384:rsa_pss_rsae_sha512:"
         "rsa_pkcs1_sha256:rsa_pkcs1_sha384:rsa_pkcs1_sha512";
}

int edgekey_tls_configure(SSL_CTX *ctx, const edgekey_tls_config *cfg, edgekey_tls_status *status,
                          char *why, size_t why_len) {
  pthread_once(&index_once, make_indexes);
  edgekey_tls_status st = EDGEKEY_TLS_INTERNAL;
  EVP_PKEY *pkey = NULL;
  STACK_OF(X509) *chain = NULL, *anchors = NULL;
  X509 *leaf = NULL;
  if (why != NULL && why_len > 0) why[0] = '\0';
  ERR_clear_error();

  int has_identity = cfg != NULL && (cfg->chain_pem != NULL || cfg->key != NULL || cfg->software_key != NULL);
  if (ctx == NULL || cfg == NULL ||
      (has_identity && (cfg->chain_pem == NULL || (cfg->key == NULL) == (cfg->software_key == NULL)))) {
    st = EDGEKEY_TLS_BAD_CHAIN;
    edgekey_set_why(why, why_len, "a certificate chain and one key (TPM or software) are required");
    goto out;
  }
  if (has_identity) {
    chain = read_certs(cfg->chain_pem);
    if (chain == NULL || sk_X509_num(chain) == 0) {
      st = EDGEKEY_TLS_BAD_CHAIN;
      edgekey_set_why(why, why_len, "our certificate chain holds no PEM certificate");
      goto out;
    }
    leaf = sk_X509_value(chain, 0);
    char subject[256], issuer[256], nb[40], na[40];
    describe_cert(leaf, subject, issuer, nb, na);
    if (X509_cmp_current_time(X509_get0_notAfter(leaf)) < 0) {
      st = EDGEKEY_TLS_CERT_EXPIRED;
      edgekey_set_why(why, why_len, "our certificate %s (issuer %s) expired on %s", subject, issuer, na);
      goto out;
    }
    if (X509_cmp_current_time(X509_get0_notBefore(leaf)) > 0) {
      st = EDGEKEY_TLS_CERT_NOT_YET_VALID;
      edgekey_set_why(why, why_len,
              "our certificate %s (issuer %s) is not valid before %s (check the clock)", subject,
              issuer, nb);
      goto out;
    }
    if ((X509_get_extension_flags(leaf) & EXFLAG_XKUSAGE) &&
        !(X509_get_extended_key_usage(leaf) & XKU_SSL_CLIENT)) {
      st = EDGEKEY_TLS_CERT_NO_CLIENT_AUTH;
      edgekey_set_why(why, why_len,
              "our certificate %s (issuer %s) has an extended key usage without clientAuth",
              subject, issuer);
      goto out;
    }
    if (cfg->software_key != NULL && EVP_PKEY_up_ref(cfg->software_key))
      pkey = cfg->software_key;
    else if (cfg->key != NULL)
      pkey = edgekey_evp_pkey(cfg->key);
    if (pkey == NULL) {
      st = EDGEKEY_TLS_BAD_KEY;
      edgekey_set_why(why, why_len, "the TPM key cannot be used through OpenSSL");
      edgekey_append_openssl_error(why, why_len);
      goto out;
    }
    if (X509_check_private_key(leaf, pkey) != 1) {
      ERR_clear_error();
      st = EDGEKEY_TLS_CERT_KEY_MISMATCH;
      edgekey_set_why(why, why_len, "our certificate %s (issuer %s) is for another key than the TPM key",
              subject, issuer);
      goto out;
    }
  }
  if (cfg->trust_pem == NULL || (anchors = read_certs(cfg->trust_pem)) == NULL ||
      sk_X509_num(anchors) == 0) {
    st = EDGEKEY_TLS_BAD_TRUST;
    edgekey_set_why(why, why_len, "no trust anchor: give the CA certificate(s) the server's chain ends in");
    goto out;
  }
  if ((cfg->server_name == NULL || cfg->server_name[0] == '\0') && !cfg->allow_unverified_name) {
    st = EDGEKEY_TLS_NO_SERVER_NAME;
    edgekey_set_why(why, why_len, "the server's host name or IP address is required to verify it");
    goto out;
  }

  st = EDGEKEY_TLS_INTERNAL;
  int min = cfg->min_version ? cfg->min_version : TLS1_2_VERSION;
  int max = cfg->max_version ? cfg->max_version : TLS1_3_VERSION;
  if (!SSL_CTX_set_min_proto_version(ctx, min) || !SSL_CTX_set_max_proto_version(ctx, max))
    goto fail;
  /* TLS 1.2: ECDHE with AEAD only (forward secret); TLS 1.3 suites are all forward secret. */
  if (!SSL_CTX_set_cipher_list(ctx, "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL")) goto fail;
  SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION);
  if (pkey != NULL) {
    if (!SSL_CTX_set1_client_sigalgs_list(ctx, client_sigalgs(pkey))) goto fail;
    if (SSL_CTX_use_certificate(ctx, leaf) != 1 || SSL_CTX_use_PrivateKey(ctx, pkey) != 1 ||
        SSL_CTX_check_private_key(ctx) != 1)
      goto fail;
    for (int i = 1; i < sk_X509_num(chain); i++)
      if (!SSL_CTX_add1_chain_cert(ctx, sk_X509_value(chain, i))) goto fail;
  }

  /* Our anchors only: a context handed to us (libcurl's) may hold the system store. */
  X509_STORE *store = X509_STORE_new();
  if (store == NULL) goto fail;
  SSL_CTX_set_cert_store(ctx, store);
  for (int i = 0; i < sk_X509_num(anchors); i++)
    if (!X509_STORE_add_cert(store, sk_X509_value(anchors, i))) goto fail;
  if (cfg->alpn != NULL && cfg->alpn[0] != '\0') {
    /* "a,b" as ALPN's wire format: each protocol prefixed with its length (RFC 7301 3.1). */
    unsigned char wire[256];
    size_t n = 0;
    const char *p = cfg->alpn;
    while (*p != '\0') {
      const char *end = strchr(p, ',');
      size_t len = end != NULL ? (size_t)(end - p) : strlen(p);
      if (len == 0 || len > 255 || n + 1 + len > sizeof(wire)) {
        edgekey_set_why(why, why_len, "ALPN list \"%s\": each protocol 1 to 255 bytes, 255 in all",
                        cfg->alpn);
        goto out;
      }
      wire[n++] = (unsigned char)len;
      memcpy(wire + n, p, len);
      n += len;
      p += len + (end != NULL);
    }
    if (SSL_CTX_set_alpn_protos(ctx, wire, (unsigned int)n) != 0) goto fail;
  }
  if (cfg->crl_pem != NULL) {
    BIO *b = BIO_new_mem_buf(cfg->crl_pem, -1);
    X509_CRL *crl;
    int n = 0;
    while (b != NULL && (crl = PEM_read_bio_X509_CRL(b, NULL, NULL, NULL)) != NULL) {
      X509_STORE_add_crl(store, crl);
      X509_CRL_free(crl);
      n++;
    }
    BIO_free(b);
    ERR_clear_error();
    if (n == 0) {
      st = EDGEKEY_TLS_BAD_CRL;
      edgekey_set_why(why, why_len, "the CRL text holds no PEM CRL");
      goto out;
    }
    /* Every certificate of the server's chain against its issuer's CRL: a revoked
     * intermediate must fail as a revoked leaf does (openssl verify -crl_check_all). */
    X509_STORE_set_flags(store, X509_V_FLAG_CRL_CHECK | X509_V_FLAG_CRL_CHECK_ALL);
  }

  X509_VERIFY_PARAM *param = SSL_CTX_get0_param(ctx);
  /* An IP literal is verified as an IP address and never sent as SNI (RFC 6066 3). */
  unsigned char addr[16];
  int has_name = cfg->server_name != NULL && cfg->server_name[0] != '\0';
  int is_ip = has_name && (inet_pton(AF_INET, cfg->server_name, addr) == 1 ||
                           inet_pton(AF_INET6, cfg->server_name, addr) == 1);
  if (has_name) {
    int ok = is_ip ? X509_VERIFY_PARAM_set1_ip_asc(param, cfg->server_name)
                   : X509_VERIFY_PARAM_set1_host(param, cfg->server_name, 0);
    if (!ok) goto fail;
    X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
  }
  X509_VERIFY_PARAM_set_purpose(param, X509_PURPOSE_SSL_SERVER);
  ctx_policy *policy = SSL_CTX_get_ex_data(ctx, ctx_index);
  if (policy == NULL) {
    policy = calloc(1, sizeof(*policy));
    if (policy == NULL) goto fail;
    pthread_mutex_init(&policy->lock, NULL);
    SSL_CTX_set_ex_data(ctx, ctx_index, policy);
  }
  policy->require_server_auth_eku = !cfg->allow_missing_server_auth_eku;
  policy->accept_cmc_ra = cfg->accept_cmc_ra;
  policy->crl_missing_ok = cfg->crl_missing_ok;
  policy->sni[0] = '\0';
  if (has_name && !is_ip && strlen(cfg->server_name) < sizeof(policy->sni))
    snprintf(policy->sni, sizeof(policy->sni), "%s", cfg->server_name);
  SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, verify_callback);
  SSL_CTX_set_info_callback(ctx, info_callback);
  SSL_CTX_set_msg_callback(ctx, msg_callback);
  st = EDGEKEY_TLS_OK;
  goto out;

fail:
  edgekey_set_why(why, why_len, "OpenSSL refused a setting");
  edgekey_append_openssl_error(why, why_len);
out:
  EVP_PKEY_free(pkey);
  sk_X509_pop_free(chain, X509_free);
  sk_X509_pop_free(anchors, X509_free);
  if (status != NULL) *status = st;
  return st == EDGEKEY_TLS_OK;
}

SSL_CTX *edgekey_tls_client_ctx(const edgekey_tls_config *cfg, edgekey_tls_status *status,
                                char *why, size_t why_len) {
  if (cfg == NULL || cfg->chain_pem == NULL || (cfg->key == NULL) == (cfg->software_key == NULL)) {
    if (status != NULL) *status = EDGEKEY_TLS_BAD_CHAIN;
    edgekey_set_why(why, why_len, "a certificate chain and one key (TPM or software) are required");
    return NULL;
  }
  SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
  if (ctx == NULL) {
    if (status != NULL) *status = EDGEKEY_TLS_INTERNAL;
    edgekey_set_why(why, why_len, "OpenSSL cannot make a context");
    edgekey_append_openssl_error(why, why_len);
    return NULL;
  }
  if (!edgekey_tls_configure(ctx, cfg, status, why, why_len)) {
    SSL_CTX_free(ctx);
    return NULL;
  }
  ctx_policy *policy = SSL_CTX_get_ex_data(ctx, ctx_index);
  policy->resume = cfg->resume_sessions != 0;
  policy->max_age_ms = cfg->session_max_age_ms > 0 ? cfg->session_max_age_ms : 3600 * 1000LL;
  if (policy->resume) {
    /* Kept by us, per endpoint (keep_session), not in OpenSSL's cache: OpenSSL's client cache
     * is never consulted by SSL_connect anyway. */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(ctx, keep_session);
  } else {
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  }
  return ctx;
}

/* ---- Diagnosis ------------------------------------------------------------------------------ */

static edgekey_tls_layer layer_of_alert(int alert) {
  switch (alert) {
  case SSL_AD_BAD_CERTIFICATE:
  case SSL_AD_UNSUPPORTED_CERTIFICATE:
  case SSL_AD_CERTIFICATE_REVOKED:
  case SSL_AD_CERTIFICATE_EXPIRED:
  case SSL_AD_CERTIFICATE_UNKNOWN:
  case SSL_AD_UNKNOWN_CA:
  case SSL_AD_ACCESS_DENIED:
  case SSL_AD_DECRYPT_ERROR:
  case 116: /* certificate_required (TLS 1.3) */
    return EDGEKEY_LAYER_CLIENT_CERTIFICATE;
  case SSL_AD_PROTOCOL_VERSION:
  case SSL_AD_INSUFFICIENT_SECURITY:
  case SSL_AD_HANDSHAKE_FAILURE:
  case SSL_AD_ILLEGAL_PARAMETER:
    return EDGEKEY_LAYER_PROTOCOL;
  default:
    return EDGEKEY_LAYER_TLS;
  }
}

static int is_protocol_reason(int reason) {
  switch (reason) {
  case SSL_R_UNSUPPORTED_PROTOCOL:
  case SSL_R_NO_PROTOCOLS_AVAILABLE:
  case SSL_R_WRONG_VERSION_NUMBER:
  case SSL_R_NO_SHARED_CIPHER:
  case SSL_R_NO_CIPHERS_AVAILABLE:
  case SSL_R_NO_SUITABLE_SIGNATURE_ALGORITHM:
  case SSL_R_NO_SHARED_SIGNATURE_ALGORITHMS:
  case SSL_R_UNKNOWN_PROTOCOL:
  case SSL_R_VERSION_TOO_LOW:
  case SSL_R_VERSION_TOO_HIGH:
    return 1;
  default:
    return 0;
  }
}

/* The server's certificate failed our checks: which one, at what depth, and why. */
static void explain_server_certificate(const failure_record *rec, const char *expected,
                                       edgekey_tls_failure *out) {
  out->layer = EDGEKEY_LAYER_SERVER_CERTIFICATE;
  out->verify_error = rec->verify_error;
  out->depth = rec->depth;
  memcpy(out->subject, rec->subject, sizeof(out->subject));
  memcpy(out->issuer, rec->issuer, sizeof(out->issuer));
  memcpy(out->not_before, rec->not_before, sizeof(out->not_before));
  memcpy(out->not_after, rec->not_after, sizeof(out->not_after));
  const char *what = X509_verify_cert_error_string(rec->verify_error);
  if (rec->verify_error == X509_V_ERR_INVALID_PURPOSE)
    what = "the server's certificate is not for serverAuth (extended key usage)";
  else if (rec->verify_error == X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY ||
           rec->verify_error == X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT)
    what = "its issuer was neither sent by the server nor is it a trust anchor (a missing "
           "intermediate certificate, or a CA we do not trust)";
  else if (rec->verify_error == X509_V_ERR_UNABLE_TO_GET_CRL)
    what = "no CRL from this certificate's issuer: revocation is checked at every level of the "
           "chain (give that issuer's CRL too, or allow levels without one)";
  else if (rec->verify_error == X509_V_ERR_CERT_REVOKED)
    what = "certificate revoked (by its issuer's CRL)";
  else if (rec->verify_error == X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN ||
           rec->verify_error == X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT)
    what = "the chain ends in a CA that is not among our trust anchors";
  snprintf(out->reason, sizeof(out->reason), "%s", what);
  if (rec->verify_error == X509_V_ERR_HOSTNAME_MISMATCH ||
      rec->verify_error == X509_V_ERR_IP_ADDRESS_MISMATCH) {
    size_t used = strlen(out->reason);
    snprintf(out->reason + used, sizeof(out->reason) - used, " (expected %s)",
             expected[0] ? expected : "?");
  }
}

/* The connection ended right after we sent our certificate in TLS 1.3, with no session ticket
 * and no alert that reached us: a refusal whose alert a reset overtook, or just a reset. The
 * evidence does not name our certificate, so it is reported as the network failure it surely
 * is, marked ambiguous; a caller that sees it repeat may escalate. */
static void refused_without_alert(const failure_record *r, edgekey_tls_failure *out) {
  out->layer = EDGEKEY_LAYER_NETWORK;
  out->ambiguous = 1;
  memcpy(out->subject, r->own_subject, sizeof(out->subject));
  memcpy(out->issuer, r->own_issuer, sizeof(out->issuer));
  memcpy(out->not_before, r->own_not_before, sizeof(out->not_before));
  memcpy(out->not_after, r->own_not_after, sizeof(out->not_after));
  snprintf(out->reason, sizeof(out->reason),
           "the connection ended right after we sent our certificate (TLS 1.3, no alert, no "
           "session ticket): a reset, or a refusal whose alert was lost; treated as transient");
}

edgekey_tls_layer edgekey_tls_diagnose(SSL *ssl, int ssl_error, edgekey_tls_failure *out) {
  memset(out, 0, sizeof(*out));
  out->depth = -1;
  out->alert = -1;
  int saved_errno = errno;
  pthread_once(&index_once, make_indexes);
  failure_record *rec = ssl != NULL ? record_for(ssl, 0) : NULL;

  /* The OpenSSL error queue: our provider's entries (TPM), and libssl's first reason. */
  char tpm_reason[256] = "", first[256] = "";
  int ssl_reason = 0;
  unsigned long e;
  const char *func = NULL, *data = NULL;
  int flags = 0;
  while ((e = ERR_get_error_all(NULL, NULL, &func, &data, &flags)) != 0) {
    if (func != NULL && strcmp(func, "edgekey") == 0 && tpm_reason[0] == '\0') {
      snprintf(tpm_reason, sizeof(tpm_reason), "%s",
               (data != NULL && (flags & ERR_TXT_STRING)) ? data : ERR_reason_error_string(e));
    }
    if (ERR_GET_LIB(e) == ERR_LIB_SSL && ssl_reason == 0) ssl_reason = ERR_GET_REASON(e);
    if (first[0] == '\0') ERR_error_string_n(e, first, sizeof(first));
  }
  int alert = rec != NULL ? rec->alert_received : -1;
  if (alert < 0 && ssl_reason >= SSL_AD_REASON_OFFSET && ssl_reason < SSL_AD_REASON_OFFSET + 256)
    alert = ssl_reason - SSL_AD_REASON_OFFSET;
  out->alert = alert;

  if (rec != NULL && rec->verify_error != 0) {
    explain_server_certificate(rec, rec->expected_name, out);
  } else if (tpm_reason[0] != '\0' || (rec != NULL && signing_failed(rec))) {
    signing_failure(rec, tpm_reason, out);
  } else if (alert >= 0 && layer_of_alert(alert) != EDGEKEY_LAYER_TLS) {
    out->layer = layer_of_alert(alert);
    if (out->layer == EDGEKEY_LAYER_CLIENT_CERTIFICATE && ssl != NULL) {
      describe_cert(SSL_get_certificate(ssl), out->subject, out->issuer, out->not_before,
                    out->not_after);
      snprintf(out->reason, sizeof(out->reason), "the server refused our certificate: %s",
               SSL_alert_desc_string_long(alert));
    } else {
      snprintf(out->reason, sizeof(out->reason), "the server ended the handshake: %s",
               SSL_alert_desc_string_long(alert));
    }
  } else if (is_protocol_reason(ssl_reason)) {
    out->layer = EDGEKEY_LAYER_PROTOCOL;
    snprintf(out->reason, sizeof(out->reason), "no TLS version or cipher suite agreed: %s",
             ERR_reason_error_string(ERR_PACK(ERR_LIB_SSL, 0, ssl_reason)));
  } else if (rec != NULL && probably_refused(rec)) {
    refused_without_alert(rec, out);
  } else if (ssl_error == SSL_ERROR_SYSCALL || ssl_error == SSL_ERROR_ZERO_RETURN ||
             ssl_reason == SSL_R_UNEXPECTED_EOF_WHILE_READING) {
    out->layer = EDGEKEY_LAYER_NETWORK;
    if (ssl_error == SSL_ERROR_ZERO_RETURN || ssl_reason == SSL_R_UNEXPECTED_EOF_WHILE_READING ||
        saved_errno == 0)
      snprintf(out->reason, sizeof(out->reason), "the server closed the connection");
    else
      snprintf(out->reason, sizeof(out->reason), "%s", strerror(saved_errno));
  } else {
    out->layer = EDGEKEY_LAYER_TLS;
    snprintf(out->reason, sizeof(out->reason), "%s", first[0] ? first : "unknown TLS failure");
  }
  return out->layer;
}

edgekey_tls_layer edgekey_tls_last_failure(SSL_CTX *ctx, edgekey_tls_failure *out) {
  memset(out, 0, sizeof(*out));
  out->depth = -1;
  out->alert = -1;
  pthread_once(&index_once, make_indexes);
  ctx_policy *policy = ctx != NULL ? SSL_CTX_get_ex_data(ctx, ctx_index) : NULL;
  if (policy == NULL) return EDGEKEY_LAYER_NONE;
  pthread_mutex_lock(&policy->lock);
  failure_record r = policy->last;
  int has = policy->has_last;
  policy->has_last = 0;
  pthread_mutex_unlock(&policy->lock);
  if (!has) return EDGEKEY_LAYER_NONE;
  if (r.verify_error != 0) {
    explain_server_certificate(&r, r.expected_name, out);
    return out->layer;
  }
  if (signing_failed(&r)) {
    signing_failure(&r, NULL, out);
    return out->layer;
  }
  if (probably_refused(&r)) {
    refused_without_alert(&r, out);
    return out->layer;
  }
  out->alert = r.alert_received;
  out->layer = layer_of_alert(r.alert_received);
  if (out->layer == EDGEKEY_LAYER_CLIENT_CERTIFICATE) {
    memcpy(out->subject, r.own_subject, sizeof(out->subject));
    memcpy(out->issuer, r.own_issuer, sizeof(out->issuer));
    memcpy(out->not_before, r.own_not_before, sizeof(out->not_before));
    memcpy(out->not_after, r.own_not_after, sizeof(out->not_after));
    snprintf(out->reason, sizeof(out->reason), "the server refused our certificate: %s",
             SSL_alert_desc_string_long(r.alert_received));
  } else {
    snprintf(out->reason, sizeof(out->reason), "the server ended the connection: %s",
             SSL_alert_desc_string_long(r.alert_received));
  }
  return out->layer;
}

int edgekey_tls_last_connection(SSL_CTX *ctx, edgekey_tls_connection_info *out) {
  memset(out, 0, sizeof(*out));
  out->alert = -1;
  pthread_once(&index_once, make_indexes);
  ctx_policy *policy = ctx != NULL ? SSL_CTX_get_ex_data(ctx, ctx_index) : NULL;
  if (policy == NULL) return 0;
  pthread_mutex_lock(&policy->lock);
  failure_record r = policy->last_connection;
  int has = policy->has_last_connection;
  policy->has_last_connection = 0;
  pthread_mutex_unlock(&policy->lock);
  if (!has) return 0;
  out->handshake_done = r.handshake_done;
  out->version = r.version;
  out->ticket_received = r.ticket_received;
  out->alert = r.alert_received;
  out->cert_sent = r.cert_sent;
  out->resumed = r.resumed;
  return 1;
}

int edgekey_tls_alpn_selected(const SSL *ssl, char *out, size_t cap) {
  const unsigned char *data = NULL;
  unsigned int len = 0;
  if (cap > 0) out[0] = '\0';
  if (ssl == NULL) return 0;
  SSL_get0_alpn_selected(ssl, &data, &len);
  if (data == NULL || len == 0 || len + 1 > cap) return 0;
  memcpy(out, data, len);
  out[len] = '\0';
  return 1;
}

int edgekey_tls_connection_of(SSL *ssl, edgekey_tls_connection_info *out) {
  memset(out, 0, sizeof(*out));
  out->alert = -1;
  pthread_once(&index_once, make_indexes);
  failure_record *r = ssl != NULL ? record_for(ssl, 0) : NULL;
  if (r == NULL) return 0;
  out->handshake_done = r->handshake_done;
  out->version = r->version;
  out->ticket_received = r->ticket_received;
  out->alert = r->alert_received;
  out->cert_sent = r->cert_sent;
  out->resumed = r->resumed;
  return 1;
}

int edgekey_tls_client_hello_sent(SSL *ssl) {
  pthread_once(&index_once, make_indexes);
  failure_record *r = ssl != NULL ? record_for(ssl, 0) : NULL;
  return r != NULL && r->hello_sent;
}
