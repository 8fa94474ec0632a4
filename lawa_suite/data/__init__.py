"""Data sources shared by tasks: resumable streams, caches, downloads and the embedded offline sets."""
