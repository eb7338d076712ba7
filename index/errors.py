"""The store's own error types. The layers above map them to exit codes and HTTP statuses by type.

`index/` knows nothing of the engine; these say what went wrong with the store, not how to show it.
"""


class StoreError(Exception):
    """Base of every error the store raises on purpose."""


class StoreInputError(StoreError):
    """The caller asked for something the store cannot do as asked (no store there, duplicate name ...)."""


class UnknownName(StoreInputError):
    """A named thing (a source) is not in the store."""


class StoreDamaged(StoreError):
    """A file the store owns is missing, unreadable or inconsistent; the message names the way out."""
