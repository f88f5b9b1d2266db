"""One nox session per array library, as a multi-backend CI matrix runs them.

``nox -l`` lists them. Each backend session installs only that library's
extra plus the test tools and runs the suite with ``KLDIV_SPEC_BACKENDS`` set,
so the ``xp`` fixture runs on that library alone. ``numpy_only`` installs no
optional library at all: it proves that every one of them is optional.
"""

from __future__ import annotations

import ast
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "numpy_only"]

# A bare "torch" requirement pulls a multi-GB CUDA build; this CPU build is local.
TORCH = "torch==2.13.0"
PYTEST = ("pytest", "-q", "-p", "no:cacheprovider", "-n", "auto")  # pytest-xdist: every core


def _run_tests(session: nox.Session, backend: str) -> None:
    # --run-long: the long runs (the library's whole conformance run, the GPU script's dry
    # run) that the default test command leaves out.
    session.run(
        *PYTEST,
        "--run-long",
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


def _peers_module() -> dict[str, object]:
    """Read PINS, NO_DEPS and the PEERS names from conformance/peers.py, without importing it.

    The session installs the pins before the package, so it cannot import them.
    """
    tree = ast.parse(Path("conformance/peers.py").read_text(encoding="utf-8"))
    found: dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name, value = node.target.id, node.value
            if name in ("PINS", "NO_DEPS"):
                found[name] = ast.literal_eval(value)
            elif name == "PEERS" and isinstance(value, ast.Dict):
                found[name] = tuple(ast.literal_eval(k) for k in value.keys if k is not None)
    return found


@nox.session
def peers(session: nox.Session) -> None:
    """The real KL libraries as installed (conformance/peers.py): hand checks and their matrix.

    Installs torch==2.13.0 (CPU) first, then the pins of ``peers.PINS`` (those of
    ``peers.NO_DEPS`` without their requirements: torchdistill would pull a CUDA
    torchvision, and torch stays pinned in every install), runs
    tests/test_peers.py and writes docs/conformance-peers.md with ``kldiv-spec
    check --impl peer:NAME ...`` (exit 1 there is the expected verdict: some peers
    fail MUST properties). TRITON_INTERPRET=1 runs Liger-Kernel's Triton kernel on
    the CPU.
    """
    found = _peers_module()
    pins, no_deps, names = found["PINS"], found["NO_DEPS"], found["PEERS"]
    assert isinstance(pins, tuple) and isinstance(no_deps, tuple) and isinstance(names, tuple)
    torch_pin = next(p for p in pins if p.split("==")[0] == "torch")
    bare = [p for p in pins if p.split("==")[0] in no_deps]
    session.install(torch_pin)
    session.install("--no-deps", *bare)
    session.install(*[p for p in pins if p not in bare])  # torch_pin among them: kept
    session.install("-e", ".[test]", torch_pin)
    env = {"TRITON_INTERPRET": "1", "KERAS_BACKEND": "jax", "HYPOTHESIS_PROFILE": "ci"}
    session.run("pytest", "-q", "-p", "no:cacheprovider", "tests/test_peers.py", env=env)
    # The adapters' known differences (optax, torchmetrics...), a long run.
    session.run(
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--run-long",
        "tests/test_conformance.py::test_adapters_report_the_known_differences",
        env=env,
    )
    session.run(
        "kldiv-spec",
        "check",
        *[f"--impl=peer:{name}" for name in names],
        "--no-shrink",
        "--quiet",
        "--markdown",
        "docs/conformance-peers.md",
        "--markdown-title",
        "Conformance of the libraries, as installed",
        *session.posargs,
        env=env,
        success_codes=[0, 1],
    )


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmarks behind docs/benchmarks.md, one NAME per figure (benchmarks/run.py).

    ``nox -s bench -- NAME`` runs one benchmark (``-- --list`` lists them, ``-- all``
    runs every one this machine can run, ``-- NAME --quick`` is a smoke run into
    build/bench-quick/): it writes that benchmark's result files under
    benchmarks/results/ (and its plot under docs/img/), each stamped with the commit and
    this command, and regenerates the figures of docs/benchmarks.md from them. Installs
    torch==2.13.0 (CPU) first, then every optional library and the bench extra, and
    trl and Liger-Kernel at the pins of conformance/peers.py (the JSD's peers).
    """
    if session.posargs[:1] not in (["--list"], ["-h"], ["--help"]):
        session.install(TORCH)
        session.install("-e", ".[all,bench]")
        # trl and Liger-Kernel at the peers' pins, for the JSD rows of fast-path-holes
        pins = _peers_module()["PINS"]
        assert isinstance(pins, tuple)
        jsd_peers = ("trl", "transformers", "accelerate", "datasets", "liger-kernel", "triton")
        session.install(*[p for p in pins if p.split("==")[0] in jsd_peers], TORCH)
    env = {"KLDIV_BENCH_LAUNCHER": "nox -s bench --"}
    session.run("python", "benchmarks/run.py", *session.posargs, env=env)
