/* C helpers for tests that Swift cannot do safely itself (fork in a threaded process). */
#ifndef EDGEKEY_TEST_HELPERS_H
#define EDGEKEY_TEST_HELPERS_H

#include <spawn.h>
#include <stddef.h>
#include <stdint.h>

#include "edgekey.h"

/*
 * Forks. The child signs `digest` with `key` (its first TPM use re-creates the ESAPI context),
 * sends the encoded signature back through a pipe, unloads the key and exits. When `hold_ms`
 * is positive, another thread holds the TPM's lock for that long while the fork happens, as a
 * handshake on libmosquitto's thread would. The child is killed by SIGALRM after 10 s, so a
 * deadlock shows as a failure rather than a hang.
 * Returns the child's wait status (0 for a clean exit) and the signature in `sig`/`sig_len`;
 * -1 when fork or pipe failed.
 */
int edgekey_test_sign_in_child(edgekey_tpm_key *key, TPMI_ALG_SIG_SCHEME scheme, TPMI_ALG_HASH hash,
                               const uint8_t *digest, size_t digest_len, uint8_t *sig, size_t cap,
                               size_t *sig_len, int hold_ms);

/* posix_spawn_file_actions_addclosefrom_np, which Swift's Glibc module does not expose. */
int edgekey_test_spawn_closefrom(posix_spawn_file_actions_t *actions, int from);

/* A pseudo-terminal: returns the master's descriptor and writes the slave's path into `name`;
 * -1 on failure. */
int edgekey_test_open_pty(char *name, size_t name_len);

#endif
