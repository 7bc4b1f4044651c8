"""Data: every ``--data`` source read into the same :class:`~kdcli.data.base.Data`.

:mod:`kdcli.data.sources` holds the table of sources and ``load_data``; :mod:`kdcli.data.base`
the types and checks the sources share; one module per source (``mnist``, ``idx``, ``images``,
``arrays``, ``tables``, ``jsonl``) its reader; :mod:`kdcli.data.augment` the batch augmentation.
"""
