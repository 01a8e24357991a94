"""Serving: features and matches over NVIDIA Triton's HTTP / gRPC protocol.

Owns the Triton model repository that ``cleandift-rt export-triton`` writes for NVIDIA's container
(``repository``), the ``cleandift-rt serve`` server on PyTriton (``server``, the request handling in
``handlers``, its environment in ``environment``), the wire protocol both ends share (``protocol``)
and ``Client``. It sits above ``runtime`` (an ``Engine`` is passed to the server), ``kernels``
(``match``), ``formats`` and ``features``; PyTriton and tritonclient are imported only where they
are used, so the package imports without them.
"""

from .client import Client, ServerError

__all__ = ["Client", "ServerError"]
