/*
 * A TCTI in front of the real one that counts the commands it carries. ESAPI talks to the
 * wrapper; everything is forwarded unchanged. The count is how EdgeKey proves "one TPM command
 * per handshake" from the inside; the pcap TCTI proves it from the outside.
 */
#include <stdlib.h>

#include <tss2/tss2_tcti.h>

#include "internal.h"

#define COUNTING_MAGIC 0x45444b59434e5452ull /* "EDKYCNTR" */

typedef struct {
  TSS2_TCTI_CONTEXT_COMMON_V2 common;
  TSS2_TCTI_CONTEXT *inner;
  atomic_uint_fast64_t *counter;
} counting_tcti;

static counting_tcti *self(TSS2_TCTI_CONTEXT *ctx) { return (counting_tcti *)ctx; }

static TSS2_RC transmit(TSS2_TCTI_CONTEXT *ctx, size_t size, const uint8_t *command) {
  atomic_fetch_add(self(ctx)->counter, 1);
  return Tss2_Tcti_Transmit(self(ctx)->inner, size, command);
}

static TSS2_RC receive(TSS2_TCTI_CONTEXT *ctx, size_t *size, uint8_t *response, int32_t timeout) {
  return Tss2_Tcti_Receive(self(ctx)->inner, size, response, timeout);
}

static void finalize(TSS2_TCTI_CONTEXT *ctx) {
  (void)ctx; /* the inner TCTI belongs to tctildr; edgekey_tcti_counting_free frees this one */
}

static TSS2_RC cancel(TSS2_TCTI_CONTEXT *ctx) { return Tss2_Tcti_Cancel(self(ctx)->inner); }

static TSS2_RC get_poll_handles(TSS2_TCTI_CONTEXT *ctx, TSS2_TCTI_POLL_HANDLE *handles,
                                size_t *num) {
  return Tss2_Tcti_GetPollHandles(self(ctx)->inner, handles, num);
}

static TSS2_RC set_locality(TSS2_TCTI_CONTEXT *ctx, uint8_t locality) {
  return Tss2_Tcti_SetLocality(self(ctx)->inner, locality);
}

static TSS2_RC make_sticky(TSS2_TCTI_CONTEXT *ctx, TPM2_HANDLE *handle, uint8_t sticky) {
  return Tss2_Tcti_MakeSticky(self(ctx)->inner, handle, sticky);
}

TSS2_RC edgekey_tcti_counting_wrap(TSS2_TCTI_CONTEXT *inner, TSS2_TCTI_CONTEXT **out,
                                   atomic_uint_fast64_t *counter) {
  counting_tcti *c = calloc(1, sizeof(*c));
  if (c == NULL) return EDGEKEY_RC_MEMORY;
  c->common.v1.magic = COUNTING_MAGIC;
  c->common.v1.version = 2;
  c->common.v1.transmit = transmit;
  c->common.v1.receive = receive;
  c->common.v1.finalize = finalize;
  c->common.v1.cancel = cancel;
  c->common.v1.getPollHandles = get_poll_handles;
  c->common.v1.setLocality = set_locality;
  c->common.makeSticky = make_sticky;
  c->inner = inner;
  c->counter = counter;
  *out = (TSS2_TCTI_CONTEXT *)c;
  return TSS2_RC_SUCCESS;
}

void edgekey_tcti_counting_free(TSS2_TCTI_CONTEXT *wrapper) { free(wrapper); }
