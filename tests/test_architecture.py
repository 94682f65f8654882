"""The package's architecture, read from the source with `ast` (nothing is imported).

* no import cycle between the package's modules (module-level and function-level imports);
* the layering of jaxrl_async/__init__.py: `core` is the bottom (the math imports nothing
  from the system around it), and each sub-package imports only from the ones below it;
* no module that shadows a standard-library module;
* no file of the repository points outside it.
"""

import ast
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "jaxrl_async"
PACKAGE_DIR = os.path.join(REPO, PACKAGE)

# The layers of jaxrl_async/__init__.py, lowest first: a module may import from its own layer
# and the ones before it. Top-level helpers not listed there (config, metrics_log) are free.
LAYERS = ("core", "models", "envs", "rollout", "learner", "runtime", "cluster", "train", "experiments")


def _modules() -> dict[str, str]:
    """{dotted module name: file path} of every module of the package (packages as their __init__)."""
    found = {}
    for directory, dirs, files in os.walk(PACKAGE_DIR):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            path = os.path.join(directory, f)
            parts = os.path.relpath(path, REPO)[: -len(".py")].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: str) -> set[str]:
    """The package modules `name` imports anywhere in its file (functions included).

    ``from a.b import c`` is the module ``a.b.c`` when that is a module, else ``a.b`` (a name
    defined in a.b or its __init__). Relative imports are resolved against `name`'s package.
    """
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    is_package = os.path.basename(path) == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                out.add(sub if sub in MODULES else module)
    unknown = sorted(m for m in out if m not in MODULES)
    assert not unknown, f"{name} imports {unknown}, which are not modules of the package"
    out.discard(name)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _find_cycle(graph: dict[str, set[str]]):
    """One import cycle as a list of modules ``[a, b, ..., a]``, or None."""
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(graph, white)
    stack = []

    def visit(node):
        color[node] = grey
        stack.append(node)
        for nxt in sorted(graph[node]):
            if color[nxt] == grey:
                return stack[stack.index(nxt):] + [nxt]
            if color[nxt] == white:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        color[node] = black
        return None

    for node in sorted(graph):
        if color[node] == white:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_import_graph_sees_the_package():
    # Guards the walker itself: a parser that found no edges would pass every test below.
    assert {"jaxrl_async.core.losses", "jaxrl_async.cluster", "jaxrl_async.learner.route"} <= set(MODULES)
    assert "jaxrl_async.core.losses" in GRAPH["jaxrl_async.learner.route"]
    assert "jaxrl_async.cluster" in GRAPH["jaxrl_async.train"]
    # Function-level imports count too (the sweep imports the trainer inside a function).
    assert "jaxrl_async.train" in GRAPH["jaxrl_async.experiments.sweep"]


def test_find_cycle_reports_the_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle():
    cycle = _find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _layer(module: str):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_core_imports_nothing_from_the_system_around_it():
    forbidden = ("rollout", "learner", "runtime", "experiments", "cluster", "train")
    bad = sorted((m, dep) for m, deps in GRAPH.items() if _layer(m) == "core"
                 for dep in deps if _layer(dep) in forbidden)
    assert not bad, f"core imports from layers above it: {bad}"
    # core is the bottom layer: it imports no other module of the package at all.
    outside = sorted((m, dep) for m, deps in GRAPH.items() if _layer(m) == "core"
                     for dep in deps if _layer(dep) != "core")
    assert not outside, f"core imports from outside core: {outside}"


def test_layers_import_only_from_the_layers_below():
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    bad = sorted(
        f"{m} -> {dep}" for m, deps in GRAPH.items() for dep in deps
        if _layer(m) and _layer(dep) and rank[_layer(dep)] > rank[_layer(m)]
    )
    assert not bad, f"imports against the layering {' < '.join(LAYERS)}: {bad}"


def test_no_module_shadows_the_standard_library():
    # A module named like a stdlib one (queue.py, logging.py, ...) shadows it for any script run
    # from its directory (sys.path[0]) and confuses readers; sub-package names count too.
    stdlib = set(sys.stdlib_module_names)
    shadows = sorted(
        os.path.relpath(path, REPO) for name, path in MODULES.items()
        if name != PACKAGE and name.split(".")[-1] in stdlib
    )
    assert not shadows, f"modules named like standard-library modules: {shadows}"


# -- no references to paths outside the repository ------------------------------------------

# Spelt in pieces so this file does not match itself.
OUTSIDE_PATTERNS = ("../" + "shared", "shared/" + "DESIGN.md")
TEXT_SUFFIXES = (".py", ".md", ".ipynb", ".ini", ".cfg", ".toml", ".yaml", ".yml", ".txt", ".sh")
TEXT_NAMES = ("Makefile",)
SKIP_DIRS = {"__pycache__", "node_modules"}
SKIP_TOP_DIRS = {"runs", "results"}  # run outputs (git-ignored at the repository root)


def _repo_text_files():
    for directory, dirs, files in os.walk(REPO):
        # Hidden folders (.git, caches), the virtualenv, build outputs and run outputs are not the repository's text.
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS
                         and not d.endswith(".egg-info") and not (directory == REPO and d in SKIP_TOP_DIRS))
        for f in sorted(files):
            if f.endswith(TEXT_SUFFIXES) or f in TEXT_NAMES:
                yield os.path.join(directory, f)


def test_text_file_walk_sees_the_repository():
    files = {os.path.relpath(p, REPO) for p in _repo_text_files()}
    assert {"Makefile", "README.md", "setup.py", "configs/default.py", "jaxrl_async/core/losses.py",
            "docs/design.md", "docs/results/report.md"} <= files
    assert any(f.endswith(".ipynb") for f in files)


def test_no_file_references_a_path_outside_the_repository():
    hits = []
    link = re.compile(r"\]\(([^)\s#]+)")  # markdown links: ](target)
    for path in _repo_text_files():
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        rel = os.path.relpath(path, REPO)
        for pattern in OUTSIDE_PATTERNS:
            if pattern in text:
                line = text[: text.index(pattern)].count("\n") + 1
                hits.append(f"{rel}:{line}: {pattern!r}")
        if path.endswith((".md", ".ipynb")):
            for target in link.findall(text):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("/"):
                    continue  # URLs (http:, mailto:) and site-absolute links
                resolved = os.path.normpath(os.path.join(os.path.dirname(path), target))
                if os.path.relpath(resolved, REPO).startswith(".."):
                    hits.append(f"{rel}: link {target!r} leaves the repository")
    assert not hits, "references to paths outside the repository:\n" + "\n".join(hits)

