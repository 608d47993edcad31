/*
 * EdgeKey HTTPS requests through libcurl, with the TLS identity and policy of
 * edgekey_tls_configure: the TPM key is presented through CURLOPT_SSL_CTX_FUNCTION, exactly as
 * MQTT presents it. One request per call, no redirects followed (the caller decides), HTTP/1.1,
 * https only. Used by EST enrollment; usable by C daemons.
 */
#ifndef EDGEKEY_HTTPS_H
#define EDGEKEY_HTTPS_H

#include <stddef.h>

#include "edgekey_tls.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
  EDGEKEY_HTTP_OK = 0,        /* a response arrived (whatever its status) */
  EDGEKEY_HTTP_NETWORK,       /* no connection: refused, reset, unreachable, closed early */
  EDGEKEY_HTTP_TIMEOUT,       /* connect or transfer took longer than allowed */
  EDGEKEY_HTTP_TLS,           /* the handshake failed: tls_failure says which side and why */
  EDGEKEY_HTTP_TOO_LARGE,     /* the response body exceeded max_response */
  EDGEKEY_HTTP_CONFIGURATION, /* our identity or policy could not be applied: tls_status */
  EDGEKEY_HTTP_PROTOCOL,      /* not HTTP, or a URL we refuse (not https) */
  EDGEKEY_HTTP_INTERNAL,
  EDGEKEY_HTTP_ABANDONED, /* make_body declined (its own error says why) */
  EDGEKEY_HTTP_CANCELLED, /* `cancelled` said so: the transfer was stopped */
} edgekey_http_outcome;

typedef struct {
  const char *method;       /* "GET" or "POST" */
  const char *url;          /* https:// only */
  const char *content_type; /* of the body, for POST */
  const unsigned char *body;
  size_t body_len;
  const char *username; /* HTTP Basic (sent only over TLS), or NULL */
  const char *password;
  /* Our identity and whom we trust. NULL: the server is not verified at all, which only the
   * bootstrap of a pinned CA certificate may ask for. */
  const edgekey_tls_config *tls;
  long timeout_ms;         /* the whole exchange; 30 s when 0 */
  long connect_timeout_ms; /* 10 s when 0 */
  size_t max_response;     /* body bytes; 1 MiB when 0 */
  /* Channel binding (RFC 7030 §3.5, RFC 5929 tls-unique), TLS 1.2 only. When binding_url is
   * set, the connection is opened with a GET of it (the server's cacerts), the tls-unique of
   * that connection is handed to make_body, and the body it returns (malloc'd; freed here) is
   * sent as `method` to `url` on the same connection. make_body returns 0 to abandon. */
  const char *binding_url;
  int (*make_body)(void *arg, const unsigned char *tls_unique, size_t tls_unique_len,
                   unsigned char **body, size_t *body_len);
  void *make_body_arg;
  /* Asked several times a second during the exchange (connect included); returning non-zero
   * stops it within about a second with EDGEKEY_HTTP_CANCELLED. NULL: never cancelled. */
  int (*cancelled)(void *arg);
  void *cancelled_arg;
} edgekey_http_request;

typedef struct {
  edgekey_http_outcome outcome;
  long status; /* HTTP status when outcome is OK */
  char content_type[256];
  char retry_after[128];
  char location[1024];
  char www_authenticate[256]; /* the challenge of a 401 (RFC 7235 4.1), e.g. Basic realm="EST" */
  unsigned char *body; /* malloc'd; edgekey_http_response_free releases it */
  size_t body_len;
  int tls_version;                   /* negotiated, e.g. 0x0304; 0 if unknown */
  edgekey_tls_status tls_status;     /* for EDGEKEY_HTTP_CONFIGURATION */
  edgekey_tls_failure tls_failure;   /* for EDGEKEY_HTTP_TLS */
  char reason[512];                  /* what went wrong, for every outcome but OK */
} edgekey_http_response;

/* Performs the request. Returns the outcome (also in `response`). Thread-safe. */
edgekey_http_outcome edgekey_https(const edgekey_http_request *request,
                                   edgekey_http_response *response);

void edgekey_http_response_free(edgekey_http_response *response);

/* Reads one response header line, as the server sent it (not NUL-terminated, CRLF included),
 * into `response`'s content_type, retry_after, location and www_authenticate; a status line
 * ("HTTP/...") clears them. edgekey_https calls it for every line; it is public so that it can be fuzzed. */
void edgekey_http_header_line(edgekey_http_response *response, const char *line, size_t len);

#ifdef __cplusplus
}
#endif
#endif
