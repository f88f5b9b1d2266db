"""Check kl_div and its gradients on JAX arrays sharded over two CPU devices.

Run by ``tests/test_jax_sharding.py`` in a subprocess, because the number of
CPU devices is fixed when JAX is first imported:

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python tests/_jax_sharding_check.py

For each of a few configurations (dtype; mesh axis type ``Explicit`` or
``Auto``; rows or columns split over the two devices), fast path and
reference, eagerly and under ``jax.jit``, every reduction: the loss equals the
NumPy reference on the unsharded data, and ``reduction='none'`` returns an
array with the input's sharding. ``jax.grad`` under ``jax.jit`` (inside
``jax.set_mesh``, which JAX requires for any gradient on an ``Explicit`` mesh,
plain ``jnp`` code included) and ``kldiv_spec.kl_div_backward`` (``'none'``)
give the reference's gradients, sharded as their operands. Any failure raises;
on success the script prints one JSON line: the devices, the number of cases
checked, and what :func:`reduced_backward` found. JAX is imported inside
:func:`main` only, so that importing this module (pytest's doctest collection)
needs no JAX.
"""

from __future__ import annotations

import json
import sys
import warnings
from typing import Any

REDUCTIONS = ("none", "sum", "mean", "batchmean")
#: (dtype, mesh axis type, what is split over the devices): a few configurations, as each
#: one compiles its own programs (about a second each).
CONFIGURATIONS = (
    ("float32", "Explicit", "rows"),
    ("float32", "Explicit", "columns"),
    ("float32", "Auto", "rows"),
    ("float64", "Explicit", "columns"),
)


def reference(f: Any, *args: Any, **kwargs: Any) -> Any:
    """Evaluate ``f`` with the plain reference, without the ``'mean'`` warning."""
    import kldiv_spec

    with kldiv_spec.use_reference(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return f(*args, **kwargs)


def check_close(got: Any, want: Any, atol: Any, what: str) -> None:
    """Assert equal dtype, shape, NaN pattern, and ``|got - want| <= atol`` (elementwise).

    ``atol`` is a few ulp of the size of the terms that cancel, since XLA may
    fuse and reorder them (and evaluates its own ``log``).
    """
    import numpy as np

    a, b = np.asarray(got), np.asarray(want)
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=what)
    finite = ~np.isnan(b)
    err = np.abs(a.astype(np.float64) - b.astype(np.float64))
    bound = np.broadcast_to(atol, b.shape)
    assert (err[finite] <= bound[finite]).all(), (what, a, b, err, bound)


def tolerances(x: Any, t: Any) -> tuple[Any, Any]:
    """Per-element bounds for the loss terms and the gradients: ``8 eps`` of the terms."""
    import numpy as np

    eps = float(np.finfo(x.dtype).eps)
    x64, t64 = x.astype(np.float64), t.astype(np.float64)
    with np.errstate(divide="ignore"):
        log_t = np.where(t64 > 0, np.log(np.where(t64 > 0, t64, 1.0)), 0.0)
    terms = np.abs(t64 * log_t) + np.abs(t64 * x64)
    gradient = np.abs(log_t) + 1 + np.abs(x64)
    return 8 * eps * terms, 8 * eps * gradient


def check_sharding(got: Any, sharding: Any, what: str) -> None:
    """Assert that ``got`` is laid out over the devices as ``sharding`` says."""
    assert got.sharding.is_equivalent_to(sharding, got.ndim), (what, got.sharding, sharding)


def reduced_backward() -> dict[str, str]:
    """Try ``kl_div_backward`` of ``reduction='sum'`` on sharded operands.

    Returns, for a Python float and for a 0-d JAX array as ``grad_output``, "ok"
    or the error raised. Both fail today: the float is placed on
    ``array_api_compat.device(input)``, which for an array sharded over several
    devices is its ``NamedSharding`` (which a 0-d array cannot take), and the
    0-d array's device (its sharding) is compared with the input's for equality.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import kldiv_spec

    mesh = jax.make_mesh((len(jax.devices()),), ("d",))
    sharding = NamedSharding(mesh, P("d", None))
    x = jax.device_put(np.zeros((4, 3)), sharding)
    t = jax.device_put(np.full((4, 3), 1 / 3), sharding)
    out = {}
    for name, g in (("float", 0.5), ("0-d array", jnp.asarray(0.5))):
        try:
            grad_x, _ = kldiv_spec.kl_div_backward(g, x, t, reduction="sum")
        except ValueError as e:
            out[name] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        else:
            np.testing.assert_allclose(np.asarray(grad_x), -0.5 / 3)
            out[name] = "ok"
    return out


def main() -> int:
    """Run every check; return the exit status (0: all held)."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import kldiv_spec

    n = len(jax.devices())
    assert n == 2, f"expected 2 CPU devices (XLA_FLAGS), got {jax.devices()}"
    rng = np.random.default_rng(3)
    rows, cols = 8, 6
    checked = 0

    def losses(a: Any, b: Any) -> tuple[Any, ...]:
        return tuple(kldiv_spec.kl_div(a, b, reduction=r) for r in REDUCTIONS)

    def gradients(a: Any, b: Any) -> tuple[Any, ...]:
        # one jax.grad per reduction, all in one compiled function
        return tuple(
            jax.grad(
                lambda a, b, r=r: 0.5 * jnp.sum(kldiv_spec.kl_div(a, b, reduction=r)),
                argnums=(0, 1),
            )(a, b)
            for r in REDUCTIONS
        )

    problems: dict[Any, tuple[Any, ...]] = {}
    for dtype_name, axis_name, split in CONFIGURATIONS:
        dtype, axis_type = np.dtype(dtype_name).type, getattr(AxisType, axis_name)
        if dtype not in problems:
            x = np.log(rng.dirichlet(np.ones(cols), size=rows)).astype(dtype)
            t = rng.dirichlet(np.ones(cols), size=rows).astype(dtype)
            t[::3, 1] = 0  # 0 log 0 = 0 (and a NaN target gradient there)
            g_none = np.full(x.shape, 0.5, dtype)
            want = {r: reference(kldiv_spec.kl_div, x, t, reduction=r) for r in REDUCTIONS}
            want_g = {
                r: reference(
                    kldiv_spec.kl_div_backward, g_none if r == "none" else 0.5, x, t, reduction=r
                )
                for r in REDUCTIONS
            }
            problems[dtype] = (x, t, g_none, want, want_g, *tolerances(x, t))
        x, t, g_none, want, want_g, term_tol, grad_tol = problems[dtype]
        mesh = jax.make_mesh((n,), ("d",), axis_types=(axis_type,))
        sharding = NamedSharding(mesh, P("d", None) if split == "rows" else P(None, "d"))
        sx, st = jax.device_put(x, sharding), jax.device_put(t, sharding)
        spec = sharding.spec
        for use_ref in (False, True):
            case = f"{dtype.__name__} {axis_type} {spec} reference={use_ref}"
            with kldiv_spec.use_reference(use_ref), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # 'mean'
                eager = losses(sx, st)
                # Fresh jitted functions per case: jit keeps one trace per function,
                # and use_reference() is read when a function is traced.
                jitted = jax.jit(lambda a, b: losses(a, b))(sx, st)
                with jax.set_mesh(mesh):
                    grads = jax.jit(lambda a, b: gradients(a, b))(sx, st)
                # kl_div_backward takes no grad_output for a reduction of sharded
                # operands today (see reduced_backward); jax.grad covers those.
                backward = kldiv_spec.kl_div_backward(
                    jax.device_put(g_none, sharding), sx, st, reduction="none"
                )
            for i, r in enumerate(REDUCTIONS):
                tol = term_tol if r == "none" else term_tol.sum()
                for name, got in (("eager", eager[i]), ("jit", jitted[i])):
                    check_close(got, want[r], tol, f"{case} {r} {name}")
                    if r == "none":
                        check_sharding(got, sharding, f"{case} {r} {name}")
                pairs = [("jax.grad", grads[i])]
                if r == "none":
                    pairs.append(("kl_div_backward", backward))
                for name, pair in pairs:
                    for got, w in zip(pair, want_g[r], strict=True):
                        check_close(got, w, grad_tol, f"{case} {r} {name}")
                        check_sharding(got, sharding, f"{case} {r} {name}")
                checked += 1
    print(json.dumps({"devices": n, "cases": checked, "reduced_backward": reduced_backward()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
