from setuptools import find_packages, setup

setup(
    name="progressive-denoising",
    version="0.1.0",
    description="Progressive Denoising Model (PDM): coarse-to-fine, parallel, self-correcting text-to-image "
    "token generation, as a Hugging Face-compatible model package.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["progressive_denoising", "progressive_denoising.*"]),
    include_package_data=True,
    package_data={"progressive_denoising": ["bundled/**/*"]},
    install_requires=[
        "torch>=2.1",
        "transformers>=4.46,<6",
        "diffusers>=0.30",
        "huggingface_hub>=0.25",
        "safetensors>=0.4",
        "sentencepiece",
        "tokenizers>=0.19",
        "accelerate>=0.34",
        "datasets>=2.20",
        "torchmetrics>=1.4",
        "pyyaml",
        "numpy",
        "pillow",
        "tqdm",
    ],
    extras_require={
        "train": ["evaluate", "tensorboard", "scipy"],
        # LoRA adapters (progressive_denoising/lora.py, train_pdm --use_lora, pdm generate --lora).
        "lora": ["peft>=0.13"],
        # taming-transformers-rom1504 (conversion parity tests) is installed with --no-deps: see README.
        "test": ["pytest", "evaluate", "tensorboard", "scipy", "einops", "omegaconf", "peft>=0.13"],
    },
    entry_points={"console_scripts": ["pdm=progressive_denoising.cli:main"]},
)
