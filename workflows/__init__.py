"""Batch workflows (Ray) and the ``xrcam`` command line built on the :mod:`xrcam` library."""
