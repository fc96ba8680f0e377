from setuptools import find_packages, setup

setup(
    name="ds_grace",
    version="0.1.0",
    description="GRACE-MoE for DeepSpeed-MoE: locality-aware expert grouping, replication and "
    "hierarchical sparse all-to-all for multi-node MoE inference",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ds_grace", "ds_grace.*", "benchmarks", "benchmarks.*"]),
    package_data={
        "ds_grace": [
            "data/traces/*.md",
            "data/traces/*/*.jsonl",  # mixtral/, qwen15_moe/, olmoe_tokens/
            "data/traces/*/*/*.json",
        ]
    },
    install_requires=[
        "torch>=2.4,<=2.13.0",
        "deepspeed>=0.16,<0.20",
        "transformers>=4.48,<6",
        "accelerate>=1.0,<2",
        "pydantic>=2.5,<3",
        "numpy>=1.26,<3",
        "scipy>=1.11,<2",
        "scikit-learn>=1.4,<2",
        "safetensors>=0.4,<1",
        "matplotlib>=3.8,<4",
        "tqdm>=4.66,<5",
        "pyyaml>=6,<7",
    ],
    extras_require={
        "test": ["pytest>=8,<10", "pytest-timeout>=2.3,<3", "hypothesis>=6.100,<7", "ruff>=0.6,<1"],
    },
    entry_points={"console_scripts": ["ds-grace=ds_grace.cli:main"]},
)
