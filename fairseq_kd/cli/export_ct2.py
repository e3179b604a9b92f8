"""``fairseq-kd-export-ct2``: convert a fairseq translation checkpoint (typically a distilled
student) to a CTranslate2 model directory for fast inference.

    fairseq-kd-export-ct2 student/checkpoint_best.pt data-bin --quantization int8 \\
        --output-dir student-ct2 --copy spm.model

Safe loading, a support check naming the option that cannot be converted, atomic output and an
``export.json`` record: see :mod:`fairseq_kd.ct2_export` and docs/distill-data.md.
"""

import argparse
import json
from typing import Optional, Sequence

from fairseq_kd.cli.errors import run_command
from fairseq_kd.ct2_export import QUANTIZATIONS, RECORD, export


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fairseq-kd-export-ct2",
        description="Convert a fairseq transformer checkpoint to a CTranslate2 model (needs the ct2 extra: "
        "pip install -e .[ct2]); writes the model, the copied files and " + RECORD + ".",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("checkpoint", help="fairseq checkpoint to convert (e.g. student/checkpoint_best.pt)")
    parser.add_argument("data", help="binarized data directory holding the model's dictionaries (dict.SRC.txt, "
                        "dict.TGT.txt), which become the CTranslate2 vocabularies")
    parser.add_argument("--output-dir", required=True,
                        help="directory to create; an empty one or an earlier export is replaced, anything else "
                        "is refused")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default="int8",
                        help="weight type: float32 decodes as fairseq does; int16/int8 are smaller and faster on "
                        "CPU and change a few translations")
    parser.add_argument("-s", "--source-lang", default=None,
                        help="source language (default: the checkpoint's, else inferred from DATA)")
    parser.add_argument("-t", "--target-lang", default=None,
                        help="target language (default: the checkpoint's, else inferred from DATA)")
    parser.add_argument("--copy", action="append", default=[], metavar="FILE",
                        help="copy FILE into the output directory under its name (repeatable), e.g. the "
                        "sentencepiece model the sources must be encoded with")
    parser.add_argument("--dict-dir", default=None,
                        help="directory with the dictionaries the checkpoint was trained with, checked against "
                        "DATA's (default: next to the checkpoint, then the data directory it was trained on)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = get_parser()
    args = parser.parse_args(argv)
    record = run_command(parser.prog, lambda: export(
        args.checkpoint, args.data, args.output_dir, args.quantization, args.source_lang, args.target_lang,
        args.copy, dict_dir=args.dict_dir,
    ))
    print(json.dumps(record, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
