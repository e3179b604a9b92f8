"""The models of a recipe that its speed step measures (WORK/models.tsv, written by recipe_lib.sh),
and whether a speed measurement still covers them.

    python model_list.py speed-is-current models.tsv speed.json

exits 0 when speed.json measured exactly the models that models.tsv now names for measuring, 1 when
models were added or removed since (recipe_lib.sh then sets speed.json aside and measures all again,
in one run, so that their speeds compare).
"""

import argparse
import csv
import json
import sys


def measured_models(models_tsv):
    """(name, checkpoint directory) of the teacher and of the first seed of each student group."""
    seen, models = set(), []
    with open(models_tsv, encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if row["group"] not in seen:
                seen.add(row["group"])
                models.append((row["name"], row["dir"]))
    return models


def speed_is_current(models_tsv, speed_json):
    with open(speed_json, encoding="utf-8") as f:
        speed = json.load(f)
    # speed.json from before its "models" list: the models it has speeds for
    measured = speed.get("models", list(speed["sentences_per_second"]))
    return set(measured) == {name for name, _ in measured_models(models_tsv)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("speed-is-current", help="exit 0 if SPEED_JSON measured every model of MODELS_TSV")
    check.add_argument("models_tsv")
    check.add_argument("speed_json")
    args = parser.parse_args()
    sys.exit(0 if speed_is_current(args.models_tsv, args.speed_json) else 1)


if __name__ == "__main__":
    main()
