from setuptools import setup

setup(
    name="fastjepa",
    version="0.1.0",
    description="Fast I-JEPA pretraining: packed variable-length masks, fused kernels, DeepSpeed ZeRO",
    python_requires=">=3.10",
    packages=["fastjepa", "fastjepa.models", "fastjepa.data", "fastjepa.eval", "fastjepa_kernels"],
    package_dir={"fastjepa_kernels": "kernels"},
    install_requires=[
        "torch>=2.6",
        "numpy",
        "pydantic>=2",
        "safetensors",
        "tqdm",
        "pillow",
        "scikit-learn",
    ],
    extras_require={
        "triton": ["triton>=3.4"],
        "deepspeed": ["deepspeed>=0.19"],
        "tensorboard": ["tensorboard"],
        # NVIDIA DALI for data.loader=dali: the CUDA 12 build (nvidia-dali-cuda130 for CUDA 13 drivers);
        # its CPU pipelines need no GPU
        "dali": ["nvidia-dali-cuda120>=1.40"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "deepspeed>=0.19", "nvidia-dali-cuda120>=1.40"],
    },
    entry_points={"console_scripts": ["fastjepa-train=fastjepa.trainer:main", "fastjepa-convert=fastjepa.convert:main"]},
)
