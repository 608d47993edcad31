/*
 * EdgeKey C API: TPM-held keys for OpenSSL 3, for Swift and for C daemons.
 *
 * One `edgekey_tpm` per TPM per process holds the ESAPI context behind one lock; ESAPI is
 * neither thread-safe nor fork-safe, so every use goes through edgekey_tpm_acquire(), which
 * also re-creates the context in a child after fork(). Keys (`edgekey_tpm_key`) hold a
 * reference to their context, load themselves lazily and stay loaded, so that signing costs
 * exactly one TPM command (TPM2_Sign).
 *
 * Ownership: every object returned through an `out` pointer belongs to the caller and is
 * released with its _free/_unref function. Borrowed pointers are marked as such.
 * Every function returning TSS2_RC returns TSS2_RC_SUCCESS (0) or the TPM/TSS response code;
 * when `cmd` is not NULL it receives the static name of the command that failed.
 */
#ifndef EDGEKEY_H
#define EDGEKEY_H

#include <stddef.h>
#include <stdint.h>
#include <tss2/tss2_esys.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Response codes of EdgeKey's own layer (TSS layer 12, unused by tpm2-tss). */
#define EDGEKEY_RC_LAYER ((TSS2_RC)(12u << TSS2_RC_LAYER_SHIFT))
#define EDGEKEY_RC_NO_TPM (EDGEKEY_RC_LAYER | 1u)       /* no TCTI could be opened */
#define EDGEKEY_RC_BAD_KEYFILE (EDGEKEY_RC_LAYER | 2u)  /* malformed TSS2 PRIVATE KEY */
#define EDGEKEY_RC_BAD_ARGUMENT (EDGEKEY_RC_LAYER | 3u) /* caller error */
#define EDGEKEY_RC_MEMORY (EDGEKEY_RC_LAYER | 4u)       /* allocation failed */
#define EDGEKEY_RC_SRK_MISMATCH (EDGEKEY_RC_LAYER | 5u) /* 0x81000001 is not the standard SRK */
#define EDGEKEY_RC_NOT_A_SIGNING_KEY (EDGEKEY_RC_LAYER | 6u)
#define EDGEKEY_RC_AUTH_REQUIRED (EDGEKEY_RC_LAYER | 7u) /* the key has a password; none given */
#define EDGEKEY_RC_TPM_TIMEOUT (EDGEKEY_RC_LAYER | 8u)   /* the TPM did not answer in time */

/* The owner hierarchy: the parent that TSS2 PRIVATE KEY readers re-create the SRK under. */
#define EDGEKEY_PARENT_OWNER 0x40000001u
/* Where the standard SRK is persisted by convention (TCG provisioning guidance). */
#define EDGEKEY_SRK_HANDLE 0x81000001u

/* ---- The shared TPM context -------------------------------------------------------------- */

typedef struct edgekey_tpm edgekey_tpm;
typedef struct edgekey_tcti_stats edgekey_tcti_stats;

/*
 * Opens a TPM. `tcti` is a tctildr string ("device:/dev/tpmrm0", "tabrmd",
 * "swtpm:host=127.0.0.1,port=2321") or NULL to resolve: EDGEKEY_TCTI, then TPM2TOOLS_TCTI, then
 * device:/dev/tpmrm0. Each configured candidate is tried in order until one answers; on
 * failure `why` (if not NULL) receives every candidate tried and why it failed.
 * The TPM is started up (TPM2_Startup(CLEAR), tolerated when already done). Over a TCTI
 * without a resource manager (swtpm, mssim, /dev/tpm0), transient objects leaked by a process
 * that died are flushed. Costs a few TPM commands. Returns a context with one reference.
 */
TSS2_RC edgekey_tpm_open(const char *tcti, edgekey_tpm **out, char *why, size_t why_len);

/* The candidates edgekey_tpm_open() tries, in order (borrowed strings). Returns the count. */
int edgekey_tcti_candidates(const char *tcti, const char *out[4]);

/* Opens exactly `tcti`, with no fallback (see edgekey_tpm_open() for what opening does). */
TSS2_RC edgekey_tpm_open_exact(const char *tcti, edgekey_tpm **out, char *why, size_t why_len);

/*
 * Every TPM command is bounded: one that gets no answer within the timeout ends in
 * EDGEKEY_RC_TPM_TIMEOUT, the ESAPI context is discarded, and the next use makes it again
 * (so a TPM that answers again is used again). The bound holds over every TCTI, including
 * those whose reads have no deadline (swtpm, mssim): the command runs on a thread of the
 * context's own that is abandoned when it is overdue.
 * Defaults: EDGEKEY_TPM_TIMEOUT_MS (else 10 s: a real chip signs in 25-540 ms) for every
 * command but key generation (TPM2_Create, CreatePrimary, CreateLoaded, SelfTest), which gets
 * EDGEKEY_TPM_KEYGEN_TIMEOUT_MS (else 120 s: RSA-2048 creation takes up to 7.5 s on real
 * chips, RSA-3072 several times that).
 */
#define EDGEKEY_DEFAULT_TPM_TIMEOUT_MS 10000
#define EDGEKEY_DEFAULT_TPM_KEYGEN_TIMEOUT_MS 120000
int32_t edgekey_tpm_timeout_ms(void);
int32_t edgekey_tpm_keygen_timeout_ms(void);
/* Sets this context's bounds (milliseconds, > 0), from the next command on. Thread-safe. */
void edgekey_tpm_set_timeouts(edgekey_tpm *tpm, int32_t timeout_ms, int32_t keygen_timeout_ms);
void edgekey_tpm_get_timeouts(edgekey_tpm *tpm, int32_t *timeout_ms, int32_t *keygen_timeout_ms);
/* Commands given up on (timed out) whose TCTI call has not returned yet: over swtpm and mssim,
 * whose reads have no deadline, until the TPM answers; 0 in steady state. No TPM traffic. */
int edgekey_tpm_stuck_commands(const edgekey_tpm *tpm);

/* Adds a reference. */
edgekey_tpm *edgekey_tpm_ref(edgekey_tpm *tpm);
/* Drops a reference; the last one finalizes the ESAPI context and the TCTI. */
void edgekey_tpm_unref(edgekey_tpm *tpm);

/* Number of TPM commands this context has sent since it was opened (counted at the TCTI). */
uint64_t edgekey_tpm_command_count(const edgekey_tpm *tpm);

/* The TCTI string this context was opened with (borrowed, lives as long as `tpm`). */
const char *edgekey_tpm_tcti(const edgekey_tpm *tpm);
/* 1 when the TCTI talks to the TPM without a resource manager (3 object slots on swtpm). */
int edgekey_tpm_is_direct(const edgekey_tpm *tpm);
/* Number of transient objects flushed at open because a dead process had leaked them. */
int edgekey_tpm_leaked_flushed(const edgekey_tpm *tpm);

/*
 * Locks the context and returns its ESAPI context (borrowed until edgekey_tpm_release()).
 * Re-creates the ESAPI context first if the process has forked. Returns NULL with *rc set when
 * the context cannot be re-created. Every acquire must be paired with one release.
 */
ESYS_CONTEXT *edgekey_tpm_acquire(edgekey_tpm *tpm, TSS2_RC *rc);
void edgekey_tpm_release(edgekey_tpm *tpm);
/*
 * Release, telling the context how the last command ended. A transport failure (the TPM went
 * away in the middle of a command: a TCTI error) leaves ESAPI refusing every later call with
 * "bad sequence"; such a context is thrown away here and made again by the next acquire, which
 * also loads our objects again (a TPM that went away has usually been reset).
 */
void edgekey_tpm_release_after(edgekey_tpm *tpm, TSS2_RC rc);
/* 1 when `rc` is such a transport failure. */
int edgekey_rc_breaks_context(TSS2_RC rc);

/*
 * The storage root key, with the context held: the persistent SRK at 0x81000001 when present
 * and equal to the standard template, else a transient primary created from it (3-5 ms on
 * swtpm, up to seconds on a real chip). When *is_transient is set, the caller flushes it.
 */
TSS2_RC edgekey_tpm_srk_locked(edgekey_tpm *tpm, ESYS_CONTEXT *esys, ESYS_TR *srk,
                               int *is_transient, const char **cmd);

/* The standard SRK template: ECC P-256, AES-128-CFB, empty unique (what tpm2-openssl uses). */
void edgekey_srk_template(TPM2B_PUBLIC *out);

/*
 * Makes room for one more object when the TPM answered TPM2_RC_OBJECT_MEMORY (0x902): flushes
 * the key of ours used longest ago (it is loaded again on its next use), or over a TCTI without
 * a resource manager the objects leaked by other processes, but never `keep` (the parent the
 * caller is using). Returns 1 when something was flushed, 0 when there was nothing to flush.
 * Context held.
 */
int edgekey_tpm_make_room(edgekey_tpm *tpm, ESYS_CONTEXT *esys, ESYS_TR keep);

/* Flushes every transient object in the TPM (leaked by dead processes). Context held. */
TSS2_RC edgekey_tpm_flush_all_transients_locked(edgekey_tpm *tpm, ESYS_CONTEXT *esys,
                                                int *flushed);

/* ---- Keys -------------------------------------------------------------------------------- */

typedef struct edgekey_tpm_key edgekey_tpm_key;

/*
 * A key held as blobs under `parent` (EDGEKEY_PARENT_OWNER for the standard SRK, or a
 * persistent parent handle). No TPM traffic: the key is loaded on first use.
 * `pub` and `priv` are marshaled TPM2B_PUBLIC / TPM2B_PRIVATE (with their size prefix).
 */
TSS2_RC edgekey_tpm_key_from_blobs(edgekey_tpm *tpm, uint32_t parent, const uint8_t *pub,
                                   size_t pub_len, const uint8_t *priv, size_t priv_len,
                                   const uint8_t *auth, size_t auth_len, edgekey_tpm_key **out);

/* A key persisted at `handle` (0x81xxxxxx). Reads its public area (one TPM2_ReadPublic). */
TSS2_RC edgekey_tpm_key_from_persistent(edgekey_tpm *tpm, uint32_t handle, const uint8_t *auth,
                                        size_t auth_len, edgekey_tpm_key **out,
                                        const char **cmd);

/* Keys are reference-counted: ref adds one, free drops one; the last flushes and frees. */
edgekey_tpm_key *edgekey_tpm_key_ref(edgekey_tpm_key *key);
void edgekey_tpm_key_free(edgekey_tpm_key *key);

/* The context the key belongs to (borrowed, lives as long as `key`). */
edgekey_tpm *edgekey_tpm_key_context(const edgekey_tpm_key *key);

/* The key's public area (borrowed, lives as long as `key`). No TPM traffic. */
const TPM2B_PUBLIC *edgekey_tpm_key_public(const edgekey_tpm_key *key);

/* Loads the key now if it is not loaded (SRK + TPM2_Load + flush SRK). */
TSS2_RC edgekey_tpm_key_load(edgekey_tpm_key *key, const char **cmd);

/* Flushes the key's transient object, if loaded; the next use loads it again. */
void edgekey_tpm_key_unload(edgekey_tpm_key *key);

/*
 * Signs `digest` with one TPM2_Sign (NULL ticket). `scheme` is TPM2_ALG_ECDSA, TPM2_ALG_RSASSA
 * or TPM2_ALG_RSAPSS; `hash` the digest's algorithm. Loads the key first if needed, and loads
 * it again once if the TPM lost it (reset, fork, flushed by another process).
 */
TSS2_RC edgekey_tpm_key_sign(edgekey_tpm_key *key, TPMI_ALG_SIG_SCHEME scheme, TPMI_ALG_HASH hash,
                             const uint8_t *digest, size_t digest_len, TPMT_SIGNATURE *out,
                             const char **cmd);

/*
 * An attestation key held as blobs: a restricted signing key (TPM2_Certify, TPM2_Quote), never
 * a signer of arbitrary digests. EDGEKEY_RC_NOT_A_SIGNING_KEY for anything else. No TPM traffic.
 */
TSS2_RC edgekey_tpm_attestation_key_from_blobs(edgekey_tpm *tpm, uint32_t parent,
                                               const uint8_t *pub, size_t pub_len,
                                               const uint8_t *priv, size_t priv_len,
                                               edgekey_tpm_key **out);

/*
 * With the context's lock held (edgekey_tpm_acquire): loads `key` if needed and gives its
 * ESYS_TR, valid until the lock is released.
 */
TSS2_RC edgekey_tpm_key_load_locked(edgekey_tpm_key *key, ESYS_CONTEXT *esys, ESYS_TR *handle,
                                    const char **cmd);

/*
 * TPM2_Certify of `key` by the attestation key `ak` over `qualifying` (the verifier's nonce,
 * at most 64 bytes): the TPMS_ATTEST (in `attest`) and the AK's signature over it. Loads the
 * keys if needed (they stay loaded), and once more if the TPM lost one of them.
 */
TSS2_RC edgekey_tpm_key_certify(edgekey_tpm_key *key, edgekey_tpm_key *ak,
                                const uint8_t *qualifying, size_t qualifying_len,
                                TPM2B_ATTEST *attest, TPMT_SIGNATURE *signature,
                                const char **cmd);

/*
 * Installs, once per process, what the first TPM open installs: the decoder of EdgeKey's own
 * response codes (Tss2_RC_Decode names them), the fork handlers and quiet tpm2-tss logging.
 * For callers that decode a code before any TPM was opened.
 */
void edgekey_install_process_hooks(void);

/* Number of TPM2_Load commands this key has issued (diagnostics: should stay at 1). */
uint64_t edgekey_tpm_key_load_count(const edgekey_tpm_key *key);

/* The code without the handle/parameter/session number of a format-one TPM error. */
TSS2_RC edgekey_rc_base_public(TSS2_RC rc);

/* ---- TSS2 PRIVATE KEY files (the format of tpm2-openssl and tpm2-tss-engine) ------------- */

/*
 * TPMKey ::= SEQUENCE { type OID (2.23.133.10.1.3), emptyAuth [0] EXPLICIT BOOLEAN OPTIONAL,
 *   parent INTEGER, pubkey OCTET STRING, privkey OCTET STRING }
 * pub/priv are the marshaled TPM2B_PUBLIC / TPM2B_PRIVATE. Keys with policies ([1]) or
 * imported secrets ([2]) are refused by decode.
 */
typedef struct {
  int empty_auth;
  uint32_t parent;
  uint8_t pub[sizeof(TPM2B_PUBLIC)];
  size_t pub_len;
  uint8_t priv[sizeof(TPM2B_PRIVATE)];
  size_t priv_len;
} edgekey_keyfile;

/* Decodes DER. Returns 0 on success or EDGEKEY_RC_BAD_KEYFILE; `why` says what was wrong. */
TSS2_RC edgekey_keyfile_decode(const uint8_t *der, size_t der_len, edgekey_keyfile *out,
                               char *why, size_t why_len);

/*
 * Opens a TSS2 PRIVATE KEY PEM file (EdgeKey's, tpm2-openssl's or tpm2-tss-engine's) as a key
 * of `tpm`, for C daemons. No TPM traffic until first use. On failure `why` says what was wrong.
 * A file whose emptyAuth is FALSE (or absent) needs `auth`: without it the call returns
 * EDGEKEY_RC_AUTH_REQUIRED and sends nothing to the TPM (no dictionary-attack strike).
 */
TSS2_RC edgekey_tpm_key_from_file(edgekey_tpm *tpm, const char *path, const uint8_t *auth,
                                  size_t auth_len, edgekey_tpm_key **out, char *why,
                                  size_t why_len);

/* Encodes DER into a buffer the caller frees with free(). */
TSS2_RC edgekey_keyfile_encode(const edgekey_keyfile *in, uint8_t **der, size_t *der_len);

/* ---- Public keys and signatures in OpenSSL's terms (no TPM traffic) ---------------------- */

/* The key's SubjectPublicKeyInfo DER, in a buffer the caller frees with free(). */
TSS2_RC edgekey_public_to_spki(const TPM2B_PUBLIC *pub, uint8_t **der, size_t *der_len);

/*
 * A signature as X.509 and TLS carry it: DER ECDSA-Sig-Value for ECDSA, the raw modulus-sized
 * block for RSA. `cap` is the size of `out`; on success *len is the number of bytes written.
 */
TSS2_RC edgekey_signature_encode(const TPMT_SIGNATURE *sig, uint8_t *out, size_t cap,
                                 size_t *len);

/* SHA-256 of `data` into `out` (32 bytes). */
void edgekey_sha256(const uint8_t *data, size_t len, uint8_t out[32]);

#ifdef __cplusplus
}
#endif
#endif
