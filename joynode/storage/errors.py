"""The storage actor's errors, apart so that its helpers raise and catch them too."""


class StorageError(Exception):
    """An add, fetch, export or pin that could not be done; the message says why."""


class QuotaReached(StorageError):
    """The block store is full (``storage.quota_gib``)."""
