from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithKernels(build_py):
    """The Triton kernels live in the top-level kernels/ folder, which has no __init__.py: the
    top-level name `kernels` belongs to Hugging Face's package (transformers imports it), so our folder
    is never a package of its own. In a checkout `dopsd_fast/kernels/__init__.py` reaches the folder
    through its __path__; a wheel gets the modules copied into `dopsd_fast/kernels/`."""

    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads the checkout's folder through __path__
            return
        dest = Path(self.build_lib) / "dopsd_fast" / "kernels"
        for src in sorted((ROOT / "kernels").glob("*.py")):
            self.copy_file(str(src), str(dest / src.name))


# Packages from the source tree (every dopsd_fast subpackage, present and future, dopsd_fast.kernels
# among them), and the shipped recipes in configs/ as `dopsd_fast/configs/*.yaml`
# (`dopsd-train --config zimage-turbo-lora` finds them).
setup(
    name="dopsd-fast",
    version="0.1.0",
    description="Fast, kernel-backed D-OPSD (on-policy self-distillation) trainer for step-distilled diffusion transformers",
    packages=find_packages(include=["dopsd_fast", "dopsd_fast.*"]) + ["dopsd_fast.configs"],
    package_dir={"dopsd_fast.configs": "configs"},
    cmdclass={"build_py": BuildPyWithKernels},
    package_data={"dopsd_fast.configs": ["*.yaml"], "dopsd_fast.toy": ["weights/*.safetensors", "weights/toy.json"]},
    python_requires=">=3.10",
    # the floors of transformers, peft and diffusers are also dopsd_fast.errors.LIBRARY_FLOORS, checked at import
    # (an install with --no-deps, or a library moved later, is not checked by pip)
    install_requires=[
        "torch>=2.11",
        "triton>=3.6; platform_system == 'Linux'",
        "diffusers>=0.42,<0.43",
        "transformers>=5.4,<6",  # 5.4: qwen2_vl's image_processing_pil_qwen2_vl (Z-Image); tests/test_requirements.py
        "peft>=0.18",  # < 0.18 imports transformers.HybridCache, gone in transformers 5
        "safetensors>=0.8",  # diffusers 0.42's own floor
        "tokenizers>=0.22",  # transformers 5.4's own floor
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
