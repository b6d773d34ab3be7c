"""sarkern: fused log-prob kernels and the Self-Aligned Reward (SAR, arXiv 2509.05489) for TRL."""

from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent

setup(
    name="sarkern",
    version="0.1.0",
    description="Fused Triton log-prob kernels and the Self-Aligned Reward for GRPO training with TRL",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # The Triton kernels live in the top-level `kernels/` folder but install as `sarkern.kernels`:
    # a top-level `kernels` module would clash with the PyPI package of that name.
    packages=["sarkern", "sarkern.tiny", "sarkern.kernels"],
    package_dir={"sarkern": "sarkern", "sarkern.kernels": "kernels"},
    # The bundled tiny model (a few MB) ships inside the package: it is `sarkern train`'s default.
    package_data={"sarkern.tiny": ["model/*"]},
    install_requires=[
        "torch>=2.8",  # GEMMs with fp32 output from 16-bit operands (the fused backward)
        "numpy",
        # Triton ships wheels for Linux x86-64 and aarch64 only; elsewhere the chunked PyTorch path runs.
        # 3.4: host-side TMA tensor descriptors and `tl.range(flatten=...)`.
        "triton>=3.4; platform_system == 'Linux' and (platform_machine == 'x86_64' or platform_machine == 'aarch64')",
    ],
    extras_require={
        "train": [
            # 4.56.2: TRL 1.16's own floor; CI runs the scorer, trainer and CLI tests on it (`make test-oldest`).
            "transformers>=4.56.2",
            "trl>=1.16,<2",  # tested: >=1.16,<1.17 (sarkern.trainer.TESTED_TRL)
            "accelerate>=1.4",
            "datasets>=3.0",
            "math-verify>=0.7",
            "safetensors",
            "pyyaml",
            "matplotlib",
            "rich",
            "pyarrow",
        ],
        "bench": ["pytest-benchmark>=4", "matplotlib", "liger-kernel", "cut-cross-entropy"],
        "flash": ["flash-attn>=2.6"],
        # DeepSpeed (pure Python; its ops build on first use) lets the suite test ZeRO-3 on the CPU.
        "dev": [
            "pytest>=8",
            "hypothesis>=6",
            "pytest-benchmark>=4",
            "ruff",
            "peft>=0.17",
            "deepspeed>=0.16; platform_system == 'Linux'",
        ],
    },
    entry_points={"console_scripts": ["sarkern=sarkern.cli:main"]},
)
