"""Package layout: ``megatron_hbp`` plus the top-level ``kernels/`` folder installed as
``megatron_hbp.kernels`` (never as a top-level ``kernels``: a PyPI package of that name
exists and ``transformers`` probes for it). Metadata lives in pyproject.toml."""

from setuptools import find_packages, setup

packages = find_packages(include=["megatron_hbp", "megatron_hbp.*"])
packages += ["megatron_hbp.kernels"]

setup(
    packages=packages,
    package_dir={"megatron_hbp.kernels": "kernels"},
    package_data={"megatron_hbp": ["configs/**/*.yaml", "data/assets/*"]},
    include_package_data=True,
)
