"""Score the red-flag check on the labelled prompts; prints JSON.

    python bench/safety_eval.py [--cases tests/data/safety_prompts.jsonl]

recall: red-flag prompts flagged (with their labelled category among the categories);
false_alarm_rate: benign prompts flagged. Misses and false alarms are listed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from raymed.serve.safety import check

DEFAULT_CASES = Path(__file__).resolve().parent.parent / "tests" / "data" / "safety_prompts.jsonl"


def evaluate(cases: list[dict]) -> dict:
    red = [c for c in cases if c["red_flag"]]
    benign = [c for c in cases if not c["red_flag"]]
    missed = [c["text"] for c in red if c["category"] not in check([c["text"]]).categories]
    false_alarms = [c["text"] for c in benign if check([c["text"]]).red_flag]
    return {"red_flag_prompts": len(red), "benign_prompts": len(benign),
            "recall": (len(red) - len(missed)) / len(red), "false_alarm_rate": len(false_alarms) / len(benign),
            "missed": missed, "false_alarms": false_alarms}


def read_cases(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=Path, default=DEFAULT_CASES, help="jsonl: text, red_flag, category")
    args = parser.parse_args()
    print(json.dumps(evaluate(read_cases(args.cases)), indent=1))


if __name__ == "__main__":
    main()
