"""The store's own error types. The layers above map them to exit codes and HTTP statuses by type.

`index/` knows nothing of the engine; these say what went wrong with the store, not how to show it.
Every message is one line that names the cause and the way out.
"""


class StoreError(Exception):
    """Base of every error the store raises on purpose."""

    code: str | None = None  # the word an HTTP client reads, where the type alone does not say it


def unreachable(message: str) -> StoreError:
    """The database server cannot be reached (stopped, restarting, refusing logins): exit 4 as before, but
    told apart from a damaged store for HTTP clients, which should retry rather than restore a backup."""
    error = StoreError(message)
    error.code = "database_unreachable"
    return error


class StoreInputError(StoreError):
    """The caller asked for something the store cannot do as asked (no store there, duplicate name ...)."""


class UnknownName(StoreInputError):
    """A named thing (a source) is not in the store."""


class StoreReadOnly(StoreInputError):
    """A write asked of a store that cannot be written: opened read-only, on a read-only filesystem, or
    in a folder this user may not write. Nothing was written."""


class StoreDamaged(StoreError):
    """A file the store owns is missing, unreadable or inconsistent; the message names the way out."""


class StoreUnavailable(StoreError):
    """The machine refused a store operation for now (the disk is full, another program holds the
    database's write lock, permission denied): nothing acknowledged was lost, the store stays openable,
    and the same command succeeds once the cause is gone. The files are not damaged."""


class StoreFull(StoreUnavailable):
    """No space left on the device (ENOSPC, EDQUOT, SQLITE_FULL, PostgreSQL disk full)."""


class StoreBusy(StoreUnavailable):
    """Another program held the database's write lock past the busy timeout."""


class StoreDenied(StoreUnavailable):
    """The operating system or the database server denied access to a store file or table."""


def switched_embedder(identity: str) -> StoreError:
    """Another process switched the store to another embedder (`resynth reembed`) since this one opened it:
    its vectors and keys are of the old space, so it must not write, save or answer from them."""
    error = StoreError(f"the store switched to embedder {identity} (`resynth reembed`) since this process "
                       "opened it: restart this process; it writes nothing meanwhile")
    error.code = "store_switched"
    return error


def moved_store(root: object) -> StoreError:
    """The store folder this process opened is no longer at `root` (moved, renamed, replaced)."""
    error = StoreError(f"the store folder {root} was moved, renamed or replaced since this process opened it: "
                       "restart this process (with --store naming where the store is now); it writes nothing "
                       "meanwhile, and nothing acknowledged was lost")
    error.code = "store_moved"
    return error
