"""The errors the engine raises; the CLI and the app turn them into one-line messages."""


class VisionsError(Exception):
    """Base of every error meant to be shown to a user as a message, not a traceback."""


class WeightsError(VisionsError):
    """A model or aligner weights file is missing or corrupt (the message names the file)."""


class UnreadableItemError(VisionsError):
    """An input file or item cannot be used; the message is the reason it was skipped."""


class IndexError_(VisionsError):
    """Base of the on-disk index errors."""


class IndexNotFoundError(IndexError_):
    """No index exists at the given path."""


class IndexExistsError(IndexError_):
    """An index already exists where a new one was to be created."""


class IndexFormatError(IndexError_):
    """The index on disk is of another format version or is damaged."""


class IndexMismatchError(IndexError_):
    """Vectors of another aligner id or dimension were offered to an index."""


class IndexLockedError(IndexError_):
    """Another process holds the index's write lock."""


class ItemNotFoundError(VisionsError):
    """No item with the given id or path is in the index."""


class UnsafePathError(VisionsError):
    """A path or upload would escape the folder it was confined to."""


class DatasetNotFoundError(VisionsError):
    """The dataset folder to read does not exist or is not a folder."""
