"""``fairseq-kd-user-dir``: print the directory to pass to fairseq's ``--user-dir``.

    fairseq-train DATA --user-dir "$(fairseq-kd-user-dir)" --task translation_distill ...
"""

import os


def plugin_dir() -> str:
    """Absolute path of the installed ``fairseq_kd`` package directory."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    print(plugin_dir())


if __name__ == "__main__":
    main()
