"""One nox session per array library, as a multi-backend CI matrix runs them.

``nox -l`` lists them. Each backend session installs only that library's
extra plus the test tools and runs the suite with ``KLDIV_SPEC_BACKENDS`` set,
so the ``xp`` fixture runs on that library alone. ``numpy_only`` installs no
optional library at all: it proves that every one of them is optional.
"""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "numpy_only"]

# A bare "torch" requirement pulls a multi-GB CUDA build; this CPU build is local.
TORCH = "torch==2.13.0"
PYTEST = ("pytest", "-q", "-p", "no:cacheprovider", "-n", "auto")  # pytest-xdist: every core


def _run_tests(session: nox.Session, backend: str) -> None:
    session.run(
        *PYTEST,
        *session.posargs,
        env={"KLDIV_SPEC_BACKENDS": backend, "HYPOTHESIS_PROFILE": "ci"},
    )


@nox.session
def numpy(session: nox.Session) -> None:
    """NumPy (and read-only NumPy arrays), with the test extra only."""
    session.install("-e", ".[test]")
    _run_tests(session, "numpy")


@nox.session
def array_api_strict(session: nox.Session) -> None:
    """array-api-strict, default and strictest flags: the core uses the standard only."""
    session.install("-e", ".[test,strict]")
    _run_tests(session, "array_api_strict")


@nox.session
def torch(session: nox.Session) -> None:
    """PyTorch on the CPU (and CUDA where a GPU is visible)."""
    session.install(TORCH)
    session.install("-e", ".[test,torch]")
    _run_tests(session, "torch")


@nox.session
def jax(session: nox.Session) -> None:
    """JAX, eagerly and under jax.jit, with jax.grad."""
    session.install("-e", ".[test,jax]")
    _run_tests(session, "jax")


@nox.session
def dask(session: nox.Session) -> None:
    """Dask arrays: results stay lazy."""
    session.install("-e", ".[test,dask]")
    _run_tests(session, "dask")


@nox.session
def cupy(session: nox.Session) -> None:
    """CuPy: needs an NVIDIA GPU and CUDA 12; its tests skip without one."""
    session.install("-e", ".[test,cupy]")
    _run_tests(session, "cupy")


@nox.session
def numpy_only(session: nox.Session) -> None:
    """No optional dependency installed: everything optional must skip cleanly."""
    session.install("-e", ".[test]")
    optional = ("torch", "jax", "dask", "cupy", "array_api_strict", "triton")
    check = "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) for m in sys.argv[1:]))"
    session.run("python", "-c", check, *optional, silent=True)
    session.run(*PYTEST, *session.posargs, env={"HYPOTHESIS_PROFILE": "ci"})


@nox.session
def docs(session: nox.Session) -> None:
    """The site: Sphinx, warnings as errors, nitpicky references, then the doctests.

    Builds into build/docs/html, from scratch (sphinx-build options after ``--`` go
    through). PyTorch is installed so that the edge-value table is recomputed from
    it and the examples' pictures are drawn; the build itself needs no network.
    """
    session.install(TORCH)
    session.install("-e", ".[strict,torch,bench,docs]")
    common = ("-n", "-W", "--keep-going", "-d", "build/docs/doctrees", *session.posargs)
    # -E: read every page afresh, so that every generated table, plot and output is redone.
    session.run("sphinx-build", "-E", "-b", "html", *common, "docs", "build/docs/html")
    session.run("sphinx-build", "-b", "doctest", *common, "docs", "build/docs/doctest")
    session.log("open build/docs/html/index.html")


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff: lint and format check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
