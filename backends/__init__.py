"""Fast paths: the same answers as the reference, faster, one module per array library.

Which libraries exist, which have fast paths and what each supports is said in one
place, the registry :mod:`kldiv_spec.backends._registry`; what a fast-path module
provides is :mod:`kldiv_spec.backends._protocol`. The dispatcher
(:mod:`kldiv_spec._dispatch`) imports them on first use. See
:func:`kldiv_spec.use_reference` to switch fast paths off. Every fast path is tested
against the reference and passes the conformance suite.
"""

if (
    __name__ != "kldiv_spec.backends"
):  # the folder backends/ imported by its own name, from a checkout's root
    msg = (
        "backends/ is the package kldiv_spec.backends: import it by that name (a second copy "
        "under the name 'backends' would hold a second copy of every module)"
    )
    raise ImportError(msg)


__all__: list[str] = []
