from setuptools import find_packages, setup

setup(
    name="megatron_dsv",
    version="0.1.0",
    description="DSV dynamic sparse attention for video DiT training, as a Megatron-Core plugin",
    packages=find_packages(include=["megatron_dsv", "megatron_dsv.*"]),
    python_requires=">=3.10",
    install_requires=[
        # The oldest releases with the APIs used (bmm's out_dtype, Triton's host-side TMA descriptors);
        # tested with torch 2.11 and 2.13, Triton 3.6 and 3.9 (README).
        "torch>=2.8",
        "triton>=3.4",
        "megatron-core>=0.16.1",
        "numpy",
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout", "matplotlib", "scikit-image", "av", "tensorboard", "tqdm"],
        "plot": ["matplotlib"],
        # backend="cudnn" (and a candidate of backend="auto"): cuDNN frontend's block-sparse kernels.
        "cudnn": ["nvidia-cudnn-frontend>=1.32", "nvidia-cutlass-dsl[cu13]>=4.8"],
    },
)
