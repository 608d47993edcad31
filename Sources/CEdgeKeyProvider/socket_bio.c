/* A socket BIO whose writes never raise SIGPIPE: library code leaves the process's signal
 * dispositions alone, and a peer that closes mid-write is an EPIPE on that connection. */
#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <sys/socket.h>

#include <openssl/bio.h>
#include <openssl/ssl.h>

#include "edgekey_tls.h"

static BIO_METHOD *method;
static int method_type;
static pthread_once_t method_once = PTHREAD_ONCE_INIT;

static int write_nosignal(BIO *b, const char *in, int len) {
  int fd = -1;
  BIO_get_fd(b, &fd);
  errno = 0;
  int n = (int)send(fd, in, (size_t)len, MSG_NOSIGNAL);
  BIO_clear_retry_flags(b);
  if (n <= 0 && BIO_sock_should_retry(n)) BIO_set_retry_write(b);
  return n;
}

static int puts_nosignal(BIO *b, const char *text) { return write_nosignal(b, text, (int)strlen(text)); }

/* Everything but writing is OpenSSL's socket BIO: reads, the fd and close flag (ctrl), create
 * and destroy (which closes the fd only under BIO_CLOSE). */
static void make_method(void) {
  const BIO_METHOD *socket_method = BIO_s_socket();
  int type = BIO_get_new_index() | BIO_TYPE_SOURCE_SINK | BIO_TYPE_DESCRIPTOR;
  BIO_METHOD *m = BIO_meth_new(type, "edgekey socket (MSG_NOSIGNAL)");
  if (m == NULL) return;
  if (!BIO_meth_set_write(m, write_nosignal) || !BIO_meth_set_puts(m, puts_nosignal) ||
      !BIO_meth_set_read(m, BIO_meth_get_read(socket_method)) ||
      !BIO_meth_set_ctrl(m, BIO_meth_get_ctrl(socket_method)) ||
      !BIO_meth_set_create(m, BIO_meth_get_create(socket_method)) ||
      !BIO_meth_set_destroy(m, BIO_meth_get_destroy(socket_method))) {
    BIO_meth_free(m);
    return;
  }
  method_type = type;
  method = m;
}

BIO *edgekey_bio_new_socket(int fd) {
  pthread_once(&method_once, make_method);
  if (method == NULL) return NULL;
  BIO *b = BIO_new(method);
  if (b != NULL) BIO_set_fd(b, fd, BIO_NOCLOSE);
  return b;
}

int edgekey_ssl_set_socket(SSL *ssl, int fd) {
  BIO *b = edgekey_bio_new_socket(fd);
  if (b == NULL) return 0;
  SSL_set_bio(ssl, b, b);
  return 1;
}

int edgekey_ssl_adopt_socket(SSL *ssl) {
  BIO *rbio = SSL_get_rbio(ssl);
  if (rbio == NULL || rbio != SSL_get_wbio(ssl) || BIO_method_type(rbio) != BIO_TYPE_SOCKET) return 0;
  /* A BIO that owns its fd would close it when replaced: left as it is. */
  if (BIO_get_close(rbio) != BIO_NOCLOSE) return 0;
  int fd = -1;
  if (BIO_get_fd(rbio, &fd) < 0 || fd < 0) return 0;
  /* Its library closes the socket itself (libmosquitto does); ours never closes it either. */
  return edgekey_ssl_set_socket(ssl, fd);
}

int edgekey_ssl_writes_nosignal(const SSL *ssl) {
  BIO *wbio = ssl != NULL ? SSL_get_wbio(ssl) : NULL;
  pthread_once(&method_once, make_method);
  return wbio != NULL && method != NULL && BIO_method_type(wbio) == method_type;
}
