"""The error every transformer raises for a document it cannot turn into text."""


class TransformError(ValueError):
    """The document does not fit the transformer's format; the message names the
    path inside the document (HTTP 400)."""
