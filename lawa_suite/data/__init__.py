"""Data sources shared by tasks: resumable streams, caches, downloads and the embedded offline sets."""


class DataUnavailable(RuntimeError):
    """Data could not be found or fetched; the message says what is missing and where to put it."""
