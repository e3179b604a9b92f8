"""fairseq-kd: knowledge distillation for fairseq translation models, as a plugin."""

from setuptools import find_packages, setup

with open("README.md", encoding="utf-8") as readme:
    long_description = readme.read()

setup(
    name="fairseq-kd",
    version="0.1.0",
    description="Knowledge distillation for fairseq encoder-decoder translation models (a --user-dir plugin)",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.8",
    packages=find_packages(include=["fairseq_kd", "fairseq_kd.*"]),
    install_requires=[
        # Official fairseq 0.12.2 fails at import on Python >= 3.11; fairseq-fixed ships the same
        # `fairseq` module patched for it.
        "fairseq-fixed>=0.12.3.1; python_version>='3.11'",
        "fairseq==0.12.2; python_version<'3.11'",
        "torch>=1.13",
        "numpy",
        "sacrebleu>=2.0",
        "sentencepiece",
    ],
    # matplotlib draws the recipes' BLEU-vs-parameters plot (the recipe test runs every recipe);
    # ctranslate2 runs fairseq-kd-export-ct2 and the CTranslate2 teacher engine of distill-data (and
    # the recipes measure the exported students' speed with it); ruff checks the code against
    # ruff.toml (tests/test_lint.py), one minor version because new versions add rules
    extras_require={
        "ct2": ["ctranslate2>=4.5"],
        "test": ["pytest", "matplotlib>=3.5", "ctranslate2>=4.5", "ruff>=0.17,<0.18"],
        "recipes": ["matplotlib>=3.5", "ctranslate2>=4.5"],
    },
    entry_points={
        "console_scripts": [
            "fairseq-kd-user-dir=fairseq_kd.cli.user_dir:main",
            "fairseq-kd-distill-data=fairseq_kd.cli.distill_data:main",
            "fairseq-kd-init-student=fairseq_kd.cli.init_student:main",
            "fairseq-kd-cache-teacher=fairseq_kd.cli.cache_teacher:main",
            "fairseq-kd-export-ct2=fairseq_kd.cli.export_ct2:main",
        ],
    },
)
