"""Package layout: ``megatron_hbp`` plus the top-level ``kernels/`` folder installed as
``megatron_hbp.kernels`` (never as a top-level ``kernels``: a PyPI package of that name
exists and ``transformers`` probes for it). Metadata lives in pyproject.toml."""

from setuptools import find_packages, setup

packages = find_packages(include=["megatron_hbp", "megatron_hbp.*"])
packages += ["megatron_hbp.kernels"]
# One sub-package per layer kernel (kernels/rmsnorm, kernels/rope, kernels/swiglu, ...).
packages += [f"megatron_hbp.kernels.{p}" for p in find_packages("kernels", exclude=["tests", "tests.*"])]

setup(
    packages=packages,
    package_dir={"megatron_hbp.kernels": "kernels"},
    # YAML data inside the package: model presets and hardware profiles.
    package_data={"megatron_hbp": ["presets/*.yaml"], "megatron_hbp.costmodel": ["hardware/*.yaml"]},
    include_package_data=True,
)
