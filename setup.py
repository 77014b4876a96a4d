from setuptools import find_packages, setup

# Packages from the source tree (every dopsd_fast subpackage, present and future). The top-level
# kernels/ folder installs as `dopsd_fast.kernels`, never as a top-level `kernels` module (that name
# belongs to Hugging Face's `kernels` package, which diffusers imports), and the shipped recipes in
# configs/ as `dopsd_fast/configs/*.yaml` (`dopsd-train --config zimage-turbo-lora` finds them).
setup(
    name="dopsd-fast",
    version="0.1.0",
    description="Fast, kernel-backed D-OPSD (on-policy self-distillation) trainer for step-distilled diffusion transformers",
    packages=find_packages(include=["dopsd_fast", "dopsd_fast.*"]) + ["dopsd_fast.kernels", "dopsd_fast.configs"],
    package_dir={"dopsd_fast.kernels": "kernels", "dopsd_fast.configs": "configs"},
    package_data={"dopsd_fast.configs": ["*.yaml"], "dopsd_fast.toy": ["weights/*.safetensors", "weights/toy.json"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.11",
        "triton>=3.6; platform_system == 'Linux'",
        "diffusers>=0.42,<0.43",
        "transformers>=5.2,<6",
        "peft>=0.17",
        "safetensors>=0.4",
        "tokenizers>=0.21",
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
        "tensorboard",
    ],
    extras_require={
        "dev": ["pytest>=8"],
        "science": ["matplotlib"],  # benchmarks/science/concept_experiment.py's plots
        "fp8": ["transformer-engine[pytorch]"],
        "flash": ["flash-attn"],
        "torchao": ["torchao"],
        "nvtx": ["nvtx"],
        "wandb": ["wandb"],
    },
    entry_points={
        "console_scripts": [
            "dopsd-train=dopsd_fast.cli:train_main",
            "dopsd-cache=dopsd_fast.cli:cache_main",
            "dopsd-sample=dopsd_fast.cli:sample_main",
        ]
    },
)
