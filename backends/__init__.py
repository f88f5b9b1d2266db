"""Fast paths: the same answers as the reference, faster, one module per array library.

``kldiv_spec.kl_div`` and ``kldiv_spec.kl_div_backward`` look up the module
named after the operands' library (``numpy``, ``torch``, ``jax``, ``cupy``,
``dask``) and call its ``kl_div`` / ``kl_div_backward``; a fast path returns
``NotImplemented`` for a call it does not handle and the reference takes it.
See :mod:`kldiv_spec._dispatch` for the protocol and
:func:`kldiv_spec.use_reference` to switch fast paths off. Every fast path is
tested against the reference and passes the conformance suite.
"""

__all__: list[str] = []
