"""Command line: ``python -m jaxrl_async.tau2 check --domain=D --out=DIR`` (see ``cli``)."""

from jaxrl_async.tau2.cli import run

if __name__ == "__main__":
    run()
