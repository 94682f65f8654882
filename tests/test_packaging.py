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
    for name, reqs in extras.items():
        _pins(reqs)  # every extra pinned too
    cuda = _pins(extras["cuda12"])
    assert cuda["jax-cuda12-plugin"] == cuda["jax-cuda12-pjrt"] == core["jax"]


def test_installed_versions_are_the_pins():
    from importlib.metadata import version

    install, extras = _setup_lists()
    for name, pin in {**_pins(install), **_pins(extras["test"])}.items():
        assert version(name) == pin, f"{name}: installed {version(name)}, setup.py pins {pin}"
