"""HTTP routes of the key server: they translate HTTP to :class:`KeyService` calls and back.

``health`` (``/healthz``, ``/readyz``, ``/metrics``), ``release`` (the key release protocol,
``docs/protocol.md``) and ``admin`` (bearer-token administration, ``docs/keyserver.md``).
"""
