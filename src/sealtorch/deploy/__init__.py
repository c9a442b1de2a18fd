"""Enclave deployment material: Gramine-SGX manifest templates for ``serve`` and ``keycache``.

See :mod:`sealtorch.deploy.gramine` and ``docs/deployment.md`` (Gramine-SGX and TDX).
"""
