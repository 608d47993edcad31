/* HTTPS through libcurl with the EdgeKey TLS identity (see edgekey_https.h). */
#include <ctype.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <curl/curl.h>
#include <openssl/ssl.h>

#include "edgekey_https.h"

static pthread_once_t global_once = PTHREAD_ONCE_INIT;
static void global_init(void) { curl_global_init(CURL_GLOBAL_DEFAULT); }

typedef struct {
  const edgekey_http_request *request;
  edgekey_http_response *response;
  CURL *curl;
  unsigned char tls_unique[64];
  size_t tls_unique_len; /* 0 until captured during the binding GET */
  size_t body_cap;
  int too_large;
  int configuration_failed;
  int cancelled;
  SSL_CTX *last_ctx; /* referenced: read for its last failure after libcurl frees it */
} exchange;

static CURLcode on_ssl_ctx(CURL *curl, void *ssl_ctx, void *user) {
  (void)curl;
  exchange *x = user;
  SSL_CTX *ctx = ssl_ctx;
  if (!edgekey_tls_configure(ctx, x->request->tls, &x->response->tls_status, x->response->reason,
                             sizeof(x->response->reason))) {
    x->configuration_failed = 1;
    return CURLE_ABORTED_BY_CALLBACK;
  }
  if (SSL_CTX_up_ref(ctx)) {
    SSL_CTX_free(x->last_ctx);
    x->last_ctx = ctx;
  }
  return CURLE_OK;
}

static size_t on_body(char *data, size_t size, size_t count, void *user) {
  exchange *x = user;
  edgekey_http_response *r = x->response;
  size_t n = size * count;
  size_t limit = x->request->max_response ? x->request->max_response : (1u << 20);
  if (r->body_len + n > limit) {
    x->too_large = 1;
    return 0; /* libcurl aborts with CURLE_WRITE_ERROR */
  }
  if (r->body_len + n + 1 > x->body_cap) {
    size_t cap = x->body_cap ? x->body_cap : 4096;
    while (cap < r->body_len + n + 1) cap *= 2;
    unsigned char *grown = realloc(r->body, cap);
    if (grown == NULL) return 0;
    r->body = grown;
    x->body_cap = cap;
  }
  memcpy(r->body + r->body_len, data, n);
  r->body_len += n;
  r->body[r->body_len] = '\0';
  return n;
}

/* Copies a header's value (trimmed) when its name matches. */
static void take_header(const char *line, size_t len, const char *name, char *out, size_t cap) {
  size_t name_len = strlen(name);
  if (len <= name_len || strncasecmp(line, name, name_len) != 0 || line[name_len] != ':') return;
  const char *v = line + name_len + 1;
  const char *end = line + len;
  while (v < end && (*v == ' ' || *v == '\t')) v++;
  while (end > v && isspace((unsigned char)end[-1])) end--;
  size_t n = (size_t)(end - v) < cap - 1 ? (size_t)(end - v) : cap - 1;
  memcpy(out, v, n);
  out[n] = '\0';
}

/* tls-unique (RFC 5929): the first Finished message of the connection's latest handshake, ours
 * after a full handshake, the server's after a resumption. Read while the transfer runs, when
 * libcurl's SSL is certainly the one this request uses. */
static void capture_tls_unique(exchange *x) {
  struct curl_tlssessioninfo *info = NULL;
  if (x->tls_unique_len != 0 || x->request->binding_url == NULL ||
      curl_easy_getinfo(x->curl, CURLINFO_TLS_SSL_PTR, &info) != CURLE_OK || info == NULL ||
      info->backend != CURLSSLBACKEND_OPENSSL || info->internals == NULL)
    return;
  SSL *ssl = info->internals;
  x->response->tls_version = SSL_version(ssl);
  if (SSL_version(ssl) != TLS1_2_VERSION) return; /* tls-unique is undefined in TLS 1.3 */
  size_t n = SSL_session_reused(ssl) ? SSL_get_peer_finished(ssl, x->tls_unique, sizeof(x->tls_unique))
                                     : SSL_get_finished(ssl, x->tls_unique, sizeof(x->tls_unique));
  x->tls_unique_len = n <= sizeof(x->tls_unique) ? n : 0;
}

static size_t on_header(char *data, size_t size, size_t count, void *user) {
  exchange *x = user;
  edgekey_http_response *r = x->response;
  size_t n = size * count;
  capture_tls_unique(x);
  edgekey_http_header_line(r, data, n);
  return n;
}

void edgekey_http_header_line(edgekey_http_response *r, const char *line, size_t n) {
  if (n >= 5 && strncmp(line, "HTTP/", 5) == 0) {
    /* A new response (after a 100 Continue): forget the previous one's headers. */
    r->content_type[0] = r->retry_after[0] = r->location[0] = r->www_authenticate[0] = '\0';
  }
  take_header(line, n, "WWW-Authenticate", r->www_authenticate, sizeof(r->www_authenticate));
  take_header(line, n, "Content-Type", r->content_type, sizeof(r->content_type));
  take_header(line, n, "Retry-After", r->retry_after, sizeof(r->retry_after));
  take_header(line, n, "Location", r->location, sizeof(r->location));
}

/* libcurl's progress callback: also called while connecting and while waiting for data. */
static int on_progress(void *user, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal,
                       curl_off_t ulnow) {
  (void)dltotal, (void)dlnow, (void)ultotal, (void)ulnow;
  exchange *x = user;
  if (x->request->cancelled != NULL && x->request->cancelled(x->request->cancelled_arg)) {
    x->cancelled = 1;
    return 1;
  }
  return 0;
}

static void reason(edgekey_http_response *r, const char *fmt, const char *detail) {
  if (r->reason[0] == '\0') snprintf(r->reason, sizeof(r->reason), fmt, detail);
}

edgekey_http_outcome edgekey_https(const edgekey_http_request *request,
                                   edgekey_http_response *response) {
  memset(response, 0, sizeof(*response));
  response->tls_failure.depth = -1;
  response->tls_failure.alert = -1;
  if (request == NULL || request->url == NULL || strncasecmp(request->url, "https://", 8) != 0) {
    snprintf(response->reason, sizeof(response->reason), "only https:// URLs are allowed");
    return response->outcome = EDGEKEY_HTTP_PROTOCOL;
  }
  pthread_once(&global_once, global_init);
  CURL *curl = curl_easy_init();
  if (curl == NULL) {
    snprintf(response->reason, sizeof(response->reason), "libcurl cannot make a handle");
    return response->outcome = EDGEKEY_HTTP_INTERNAL;
  }
  exchange x = {.request = request, .response = response, .curl = curl};
  char error[CURL_ERROR_SIZE] = "";
  struct curl_slist *headers = NULL;
  char content_type[300];

  curl_easy_setopt(curl, CURLOPT_URL, request->url);
  curl_easy_setopt(curl, CURLOPT_PROTOCOLS_STR, "https");
  curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(curl, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
  curl_easy_setopt(curl, CURLOPT_FOLLOWLOCATION, 0L);
  curl_easy_setopt(curl, CURLOPT_USERAGENT, "EdgeKey");
  curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, error);
  curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, request->timeout_ms ? request->timeout_ms : 30000L);
  curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS,
                   request->connect_timeout_ms ? request->connect_timeout_ms : 10000L);
  curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, on_body);
  curl_easy_setopt(curl, CURLOPT_WRITEDATA, &x);
  curl_easy_setopt(curl, CURLOPT_HEADERFUNCTION, on_header);
  curl_easy_setopt(curl, CURLOPT_HEADERDATA, &x);
  if (request->cancelled != NULL) {
    curl_easy_setopt(curl, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(curl, CURLOPT_XFERINFOFUNCTION, on_progress);
    curl_easy_setopt(curl, CURLOPT_XFERINFODATA, &x);
  }
  /* libcurl's own checks are off because ours run inside the handshake (edgekey_tls_configure:
   * our anchors only, the host name on the verify parameters, serverAuth required). */
  curl_easy_setopt(curl, CURLOPT_SSL_VERIFYPEER, 0L);
  curl_easy_setopt(curl, CURLOPT_SSL_VERIFYHOST, 0L);
  if (request->tls != NULL) {
    /* The same policy edgekey_tls_configure applies, told to libcurl too so that nothing it
     * sets on the SSL after our callback undoes it. */
    curl_easy_setopt(curl, CURLOPT_SSLVERSION, (long)(CURL_SSLVERSION_TLSv1_2 | CURL_SSLVERSION_MAX_DEFAULT));
    curl_easy_setopt(curl, CURLOPT_SSL_CIPHER_LIST, "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL");
    curl_easy_setopt(curl, CURLOPT_SSL_CTX_FUNCTION, on_ssl_ctx);
    curl_easy_setopt(curl, CURLOPT_SSL_CTX_DATA, &x);
  }
  if (request->username != NULL) {
    curl_easy_setopt(curl, CURLOPT_HTTPAUTH, (long)CURLAUTH_BASIC);
    curl_easy_setopt(curl, CURLOPT_USERNAME, request->username);
    curl_easy_setopt(curl, CURLOPT_PASSWORD, request->password ? request->password : "");
  }
  /* No "Expect: 100-continue" round trip: some EST servers do not answer it. */
  headers = curl_slist_append(headers, "Expect:");
  if (request->method != NULL && strcmp(request->method, "POST") == 0) {
    curl_easy_setopt(curl, CURLOPT_POST, 1L);
    curl_easy_setopt(curl, CURLOPT_POSTFIELDS, request->body ? (const char *)request->body : "");
    curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)request->body_len);
    if (request->content_type != NULL) {
      snprintf(content_type, sizeof(content_type), "Content-Type: %s", request->content_type);
      headers = curl_slist_append(headers, content_type);
    }
  }
  curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);

  CURLcode rc = CURLE_OK;
  unsigned char *bound_body = NULL;
  int abandoned = 0;
  if (request->binding_url != NULL && request->make_body != NULL) {
    /* The binding GET opens the connection; its answer is not wanted. */
    curl_easy_setopt(curl, CURLOPT_URL, request->binding_url);
    curl_easy_setopt(curl, CURLOPT_HTTPGET, 1L);
    rc = curl_easy_perform(curl);
    free(response->body);
    response->body = NULL;
    response->body_len = 0;
    x.body_cap = 0;
    size_t bound_len = 0;
    if (rc == CURLE_OK && x.tls_unique_len == 0) {
      snprintf(response->reason, sizeof(response->reason),
               response->tls_version == TLS1_3_VERSION
                   ? "channel binding (tls-unique) exists in TLS 1.2 only, and the server chose "
                     "TLS 1.3: cap the version at 1.2 to bind"
                   : "the connection's tls-unique could not be read");
      x.configuration_failed = 1;
      rc = CURLE_ABORTED_BY_CALLBACK;
    } else if (rc == CURLE_OK &&
               !request->make_body(request->make_body_arg, x.tls_unique, x.tls_unique_len,
                                   &bound_body, &bound_len)) {
      abandoned = 1;
      rc = CURLE_ABORTED_BY_CALLBACK;
    } else if (rc == CURLE_OK) {
      curl_easy_setopt(curl, CURLOPT_URL, request->url);
      curl_easy_setopt(curl, CURLOPT_POST, 1L);
      curl_easy_setopt(curl, CURLOPT_POSTFIELDS, bound_body ? (const char *)bound_body : "");
      curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)bound_len);
      response->content_type[0] = response->retry_after[0] = response->location[0] =
          response->www_authenticate[0] = '\0';
      rc = curl_easy_perform(curl);
      long connects = 0;
      curl_easy_getinfo(curl, CURLINFO_NUM_CONNECTS, &connects);
      if (rc == CURLE_OK && connects != 0) {
        /* The server closed the first connection: the request is bound to a connection that
         * no longer exists, and a verifying server would refuse it anyway. */
        snprintf(response->reason, sizeof(response->reason),
                 "the server closed the connection after the binding request; the bound request "
                 "went on a new connection (keep-alive needed for channel binding)");
        free(bound_body);
        curl_easy_cleanup(curl);
        curl_slist_free_all(headers);
        SSL_CTX_free(x.last_ctx);
        return response->outcome = EDGEKEY_HTTP_PROTOCOL;
      }
    }
  } else {
    rc = curl_easy_perform(curl);
  }
  free(bound_body);
  if (rc == CURLE_OK) {
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &response->status);
    struct curl_tlssessioninfo *info = NULL;
    if (curl_easy_getinfo(curl, CURLINFO_TLS_SSL_PTR, &info) == CURLE_OK && info != NULL &&
        info->backend == CURLSSLBACKEND_OPENSSL && info->internals != NULL)
      response->tls_version = SSL_version(info->internals);
  }
  /* Closes the connection, so that a refused handshake is recorded on the context. */
  curl_easy_cleanup(curl);
  curl_slist_free_all(headers);

  edgekey_http_outcome outcome = EDGEKEY_HTTP_OK;
  if (rc != CURLE_OK) {
    edgekey_tls_failure failure;
    if (x.cancelled) {
      outcome = EDGEKEY_HTTP_CANCELLED;
      reason(response, "%s", "stopped");
    } else if (abandoned) {
      outcome = EDGEKEY_HTTP_ABANDONED;
      reason(response, "%s", "the bound request was not made");
    } else if (x.configuration_failed) {
      outcome = EDGEKEY_HTTP_CONFIGURATION;
    } else if (x.too_large) {
      outcome = EDGEKEY_HTTP_TOO_LARGE;
      snprintf(response->reason, sizeof(response->reason),
               "the server's response is larger than %zu bytes",
               request->max_response ? request->max_response : (size_t)(1u << 20));
    } else if (x.last_ctx != NULL &&
               edgekey_tls_last_failure(x.last_ctx, &failure) != EDGEKEY_LAYER_NONE) {
      outcome = EDGEKEY_HTTP_TLS;
      response->tls_failure = failure;
      snprintf(response->reason, sizeof(response->reason), "%s", failure.reason);
    } else if (rc == CURLE_OPERATION_TIMEDOUT) {
      outcome = EDGEKEY_HTTP_TIMEOUT;
      reason(response, "%s", error[0] ? error : curl_easy_strerror(rc));
    } else if (rc == CURLE_SSL_CONNECT_ERROR || rc == CURLE_PEER_FAILED_VERIFICATION ||
               rc == CURLE_SSL_CERTPROBLEM) {
      outcome = EDGEKEY_HTTP_TLS;
      response->tls_failure.layer = EDGEKEY_LAYER_TLS;
      snprintf(response->tls_failure.reason, sizeof(response->tls_failure.reason), "%s",
               error[0] ? error : curl_easy_strerror(rc));
      reason(response, "%s", response->tls_failure.reason);
    } else if (rc == CURLE_UNSUPPORTED_PROTOCOL || rc == CURLE_URL_MALFORMAT ||
               rc == CURLE_WEIRD_SERVER_REPLY) {
      outcome = EDGEKEY_HTTP_PROTOCOL;
      reason(response, "%s", error[0] ? error : curl_easy_strerror(rc));
    } else {
      outcome = EDGEKEY_HTTP_NETWORK;
      reason(response, "%s", error[0] ? error : curl_easy_strerror(rc));
    }
  }
  SSL_CTX_free(x.last_ctx);
  return response->outcome = outcome;
}

void edgekey_http_response_free(edgekey_http_response *response) {
  if (response == NULL) return;
  free(response->body);
  response->body = NULL;
  response->body_len = 0;
}
