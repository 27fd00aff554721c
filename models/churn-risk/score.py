"""churn-risk: probability that a subscriber cancels next month (gradient-boosted stumps).

A batch model in plain Python (standard library only), meeting the model process contract:
reads the CSV at $DATASET (header row, the declared feature columns in any order; an
optional column may be absent or have empty cells), writes $RESULTS (header
`churn_probability`, one score per input row, in order) and exits 0. It streams, so memory
stays flat whatever the number of rows.

A sum of stumps is additive per feature, so params.json (from models/train.py) is compiled
at start into one step function per feature: scoring a row is one table lookup per column.
"""
import bisect
import csv
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TRUE = {"true", "t", "yes", "y", "1"}
FALSE = {"false", "f", "no", "n", "0"}
NUMERIC = ("tenure_months", "monthly_spend", "support_tickets")
OPTIONAL = {"support_tickets"}
CATEGORICAL = {"plan": ("basic", "plus", "premium"), "autopay": (True, False)}


def compile_stumps(params):
    """{feature: (thresholds, values)} for numeric, {feature: {level: value}} for categorical."""
    steps, levels = {}, {name: dict.fromkeys(values, 0.0) for name, values in CATEGORICAL.items()}
    by_feature = {}
    for s in params["stumps"]:
        by_feature.setdefault(s["feature"], []).append(s)
    for name in NUMERIC:
        stumps = sorted(by_feature.get(name, []), key=lambda s: s["threshold"])
        cuts = [s["threshold"] for s in stumps]
        # value when x falls after the first i thresholds: those stumps say "right", the rest "left"
        values = [sum(s["right"] for s in stumps[:i]) + sum(s["left"] for s in stumps[i:]) for i in range(len(stumps) + 1)]
        steps[name] = (cuts, values)
    for name in CATEGORICAL:
        for s in by_feature.get(name, []):
            for level in levels[name]:
                levels[name][level] += s["left"] if level == s["equals"] else s["right"]
    return steps, levels


def parse_bool(text):
    low = text.strip().lower()
    if low in TRUE:
        return True
    if low in FALSE:
        return False
    raise ValueError(f"expected true or false; got {text!r}")


def main():
    dataset, results = os.environ.get("DATASET"), os.environ.get("RESULTS")
    if not dataset or not results:
        print("churn-risk: set DATASET (input CSV) and RESULTS (output CSV)", file=sys.stderr)
        return 2
    with open(os.path.join(HERE, "params.json"), encoding="utf-8") as f:
        params = json.load(f)
    steps, levels = compile_stumps(params)
    base = params["base"]
    (tc, tv), (sc, sv), (kc, kv) = steps["tenure_months"], steps["monthly_spend"], steps["support_tickets"]
    plan_v, autopay_v = levels["plan"], levels["autopay"]
    find, exp = bisect.bisect_left, math.exp

    with open(dataset, newline="", encoding="utf-8") as src, open(results, "w", encoding="utf-8") as out:
        reader = csv.reader(src)
        header = next(reader, None)
        if header is None:
            print("churn-risk: the dataset is empty (no header row)", file=sys.stderr)
            return 2
        col = {name: i for i, name in enumerate(header)}
        missing = [n for n in (*NUMERIC, *CATEGORICAL) if n not in col and n not in OPTIONAL]
        if missing:
            print(f"churn-risk: the dataset has no column(s) {', '.join(missing)}", file=sys.stderr)
            return 2
        it, isp, ipl, iau = col["tenure_months"], col["monthly_spend"], col["plan"], col["autopay"]
        itk = col.get("support_tickets")
        out.write("churn_probability\n")
        buf = []
        for line, rec in enumerate(reader, start=2):
            try:
                tickets = rec[itk] if itk is not None else ""
                z = (base + tv[find(tc, float(rec[it]))] + sv[find(sc, float(rec[isp]))]
                     + kv[find(kc, float(tickets) if tickets != "" else -1.0)]
                     + plan_v[rec[ipl]] + autopay_v[parse_bool(rec[iau])])
            except (ValueError, KeyError, IndexError) as e:
                print(f"churn-risk: {dataset} line {line}: cannot score {rec!r}: {e!r}", file=sys.stderr)
                return 1
            buf.append("%.6g" % (1.0 / (1.0 + exp(-z))) if z > -700 else "0")
            if len(buf) >= 8192:
                buf.append("")
                out.write("\n".join(buf))
                buf.clear()
        if buf:
            buf.append("")
            out.write("\n".join(buf))
    return 0


if __name__ == "__main__":
    sys.exit(main())
