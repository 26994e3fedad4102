"""Two `mmrank ablation` outputs of the same presets and seeds (e.g. before and after a change),
compared preset by preset, paired by seed: mean ± std of each, the mean difference (after - before)
with its 95% interval, the paired t-test p-value and the verdict (`trainer.stats`).

    python -m benchmarks.compare_ablations BEFORE/ablation.json AFTER/ablation.json --metric cold_auc
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trainer.stats import describe, paired


def rows(before: dict, after: dict, metric: str) -> list[str]:
    head = [
        "preset",
        f"before {metric}",
        f"after {metric}",
        "after - before",
        "95% interval",
        "paired t p",
        "verdict",
    ]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for preset, runs in after["results"].items():
        if preset not in before["results"]:
            continue
        a = [r["test"].get(metric) for r in runs]
        b = [r["test"].get(metric) for r in before["results"][preset]]
        c = paired(a, b)
        verdict = c.verdict.replace("baseline", "before")
        cells = [preset, describe(b), describe(a), f"{c.mean:+.4f}", c.interval, c.p_text, verdict]
        out.append("| " + " | ".join(cells) + " |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--metric", default="cold_auc")
    args = parser.parse_args()
    before, after = (json.loads(p.read_text()) for p in (args.before, args.after))
    print("\n".join(rows(before, after, args.metric)))


if __name__ == "__main__":
    main()
