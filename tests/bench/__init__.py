"""``make bench``: measured speed and memory figures (JSON in bench-results/, a summary on stdout)."""
