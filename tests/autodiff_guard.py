"""What "no autodiff" means in the tests: JAX's transform names, and a switch that makes them raise."""

import jax

AUTODIFF_NAMES = {
    "grad",
    "value_and_grad",
    "vjp",
    "jvp",
    "linearize",
    "linear_transpose",
    "jacfwd",
    "jacrev",
    "hessian",
    "custom_vjp",
    "custom_jvp",
    "closure_convert",
}


def disable_autodiff(monkeypatch) -> None:
    """Make every public JAX autodiff entry point, and the internal JVP/transpose machinery they
    run on, raise AssertionError("... autodiff ...") for the rest of the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the manual backward called an autodiff transform")

    for name in AUTODIFF_NAMES & set(dir(jax)):
        monkeypatch.setattr(jax, name, forbidden)
    from jax._src.interpreters import ad

    for name in ("jvp", "linearize", "vjp", "backward_pass", "linearize_jaxpr"):
        if hasattr(ad, name):
            monkeypatch.setattr(ad, name, forbidden)
