"""Print a results.json written by `tf-secondorder bench` as a Markdown table.

python tools/results_to_markdown.py bench_out/results.json
"""

import json
import sys


def fmt(value, spec):
    return "–" if value is None else format(value, spec)


def main(path):
    report = json.load(open(path))
    print(
        f"Task `{report['task']}`, {report['steps']} steps; target "
        f"{report['target']:.5f} = final loss of the best {report['baseline']} "
        f"(lr {report['baseline_lr']:g}). Versions: "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
        + ".\n"
    )
    print(
        "| optimizer | lr | final loss | steps to target | steps × | time/step × "
        "(median) | time/step × (mean, refreshes incl.) | time to target × | "
        "refresh step / step |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in report["runs"]:
        print(
            f"| {r['optimizer']} | {r['learning_rate']:g} | {r['final_loss']:.5f} | "
            f"{fmt(r['steps_to_target'], 'd')} | {fmt(r['steps_ratio'], '.2f')} | "
            f"{r['step_time_ratio']:.2f} | {r['amortized_step_time_ratio']:.2f} | "
            f"{fmt(r['time_ratio'], '.2f')} | {fmt(r.get('refresh_cost'), '.1f')} |"
        )
    for r in report["runs"]:
        if r["optimizer"] != report["baseline"]:
            print(f"\n{r['optimizer']} options: `{json.dumps(r['options'])}`")
            break


if __name__ == "__main__":
    main(sys.argv[1])
