"""One module per ``xrcam`` sub-command; each defines ``command`` and imports nothing heavy at module level."""
