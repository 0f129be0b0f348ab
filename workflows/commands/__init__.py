"""One module per ``xrcam`` sub-command; each defines ``command`` and imports nothing heavy at module level.

:mod:`workflows.commands.conventions` (not a command) holds the one CLI convention that
:mod:`workflows.cli` applies to every command as it loads it: ``--config``, ``XRCAM_*`` environment
variables, exit codes (``docs/cli.md``), and shared option definitions such as ``classes_option``.
"""
