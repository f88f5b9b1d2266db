"""Fast paths: the same answers as the reference, faster, one module per array library.

Which libraries exist, which have a fast path and what each supports is said in
one place, the registry :mod:`kldiv_spec.backends._registry`. For a library
whose entry has one, ``kldiv_spec.kl_div`` and ``kldiv_spec.kl_div_backward``
import ``kldiv_spec.backends.<name>`` on first use and call, with the call's
validated :class:`~kldiv_spec._validation.Operands` ``ops``::

    kl_div(ops) -> array | NotImplemented
    kl_div_backward(grad_output, ops) -> (grad_input, grad_target) | NotImplemented

``ops`` holds the namespace, the operands as passed, their common dtype, the
output shape, the reduction, ``log_target``, the batch size and the divisor,
computed once. A fast path returns ``NotImplemented`` for a call it does not
handle, and the reference takes it. Reductions follow the one rounding rule,
:func:`kldiv_spec._core.divide_total`. See :func:`kldiv_spec.use_reference` to
switch fast paths off. Every fast path is tested against the reference and
passes the conformance suite.
"""

__all__: list[str] = []
