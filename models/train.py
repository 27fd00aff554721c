"""Regenerates the example models' trained parameters and sample rows: `python models/train.py`.

Each example gets a synthetic dataset drawn with a fixed seed (nothing is downloaded), is
fitted, and gets a small parameter file in its folder (`params.json`) plus `sample.csv`
(rows held out from training, what `modelplane validate` sends). The Python models are
fitted here with the standard library; the R models by their own `train.R` (R's `glm`),
to which this script hands the generated training CSV. Same seed, same bytes: the tests
rerun this into a temporary folder and compare.
"""
from __future__ import annotations

import argparse
import bisect
import csv
import json
import math
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MODELS = Path(__file__).resolve().parent
SAMPLE_ROWS = 20
TRAIN_ROWS = 6000


# -- helpers ---------------------------------------------------------------------------

def sigmoid(z: float) -> float:
    if z < -700:
        return 0.0
    return 1.0 / (1.0 + math.exp(-z))


def poisson(rng: random.Random, lam: float) -> int:
    """Knuth's method: fine for the small means used here."""
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def sig(x: float, digits: int = 12) -> float:
    """Round to significant digits so parameter files are short and stable."""
    return float(f"{x:.{digits}g}")


def cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(columns)
        for r in rows:
            w.writerow([cell(r[c]) for c in columns])


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (the systems here are ~10x10)."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[piv] = m[piv], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            if f:
                for c in range(col, n + 1):
                    m[r][c] -= f * m[col][c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x


def fit_logistic(xs: list[list[float]], ys: list[int], *, l2: float = 1e-4, iters: int = 50) -> list[float]:
    """Logistic regression by Newton-Raphson (IRLS) with a tiny ridge for stability."""
    p = len(xs[0])
    beta = [0.0] * p
    for _ in range(iters):
        grad = [-l2 * b for b in beta]
        hess = [[0.0] * p for _ in range(p)]
        for x, y in zip(xs, ys):
            mu = sigmoid(sum(b * v for b, v in zip(beta, x)))
            w, r = mu * (1.0 - mu), y - mu
            for j in range(p):
                xj = x[j]
                grad[j] += xj * r
                wx = w * xj
                row = hess[j]
                for k in range(j + 1):
                    row[k] += wx * x[k]
        for j in range(p):
            hess[j][j] += l2
            for k in range(j):
                hess[k][j] = hess[j][k]
        step = solve(hess, grad)
        beta = [b + s for b, s in zip(beta, step)]
        if max(abs(s) for s in step) < 1e-10:
            break
    return beta


# -- donor-propensity: realtime, Python, logistic regression --------------------------

REGIONS = ["west", "east", "north", "south"]


def donor_rows(rng: random.Random, n: int) -> list[dict]:
    effect = {"west": 0.0, "east": 0.35, "north": -0.25, "south": 0.1}
    rows = []
    for _ in range(n):
        net_worth = round(rng.lognormvariate(12.0, 1.3), 2)
        gifts = poisson(rng, 1.8)
        region = rng.choice(REGIONS)
        years = round(rng.uniform(0, 25), 1) if rng.random() > 0.15 else None
        board = rng.random() < 0.08
        z = (-5.2 + 0.85 * math.log10(net_worth + 1) + 0.3 * gifts + effect[region]
             + (0.04 * years if years is not None else -0.4) + 1.3 * board)
        rows.append({"net_worth": net_worth, "gifts_last_year": gifts, "region": region,
                     "years_since_first_gift": years, "board_member": board,
                     "donated": int(rng.random() < sigmoid(z))})
    return rows


def donor_design(r: dict) -> list[float]:
    # Must match models/donor-propensity/model.py: a missing optional value becomes 0 plus
    # an indicator column, so "unknown" gets its own learned effect.
    years = r["years_since_first_gift"]
    return [1.0, math.log10(max(r["net_worth"], 0.0) + 1.0), float(r["gifts_last_year"]),
            *(1.0 if r["region"] == level else 0.0 for level in REGIONS[1:]),
            years if years is not None else 0.0, 1.0 if years is None else 0.0,
            1.0 if r["board_member"] else 0.0]


def train_donor(rows: list[dict], out: Path) -> None:
    beta = fit_logistic([donor_design(r) for r in rows], [r["donated"] for r in rows])
    it = iter(beta)
    params = {
        "model": "logistic regression (Newton-Raphson), fitted by models/train.py",
        "intercept": sig(next(it)),
        "log10_net_worth": sig(next(it)),
        "gifts_last_year": sig(next(it)),
        "region": {"west": 0.0, **{level: sig(next(it)) for level in REGIONS[1:]}},
        "years_since_first_gift": sig(next(it)),
        "years_since_first_gift_missing": sig(next(it)),
        "board_member": sig(next(it)),
        "training_rows": len(rows),
    }
    write_json(out / "params.json", params)


# -- churn-risk: batch, Python, gradient-boosted stumps -------------------------------

PLANS = ["basic", "plus", "premium"]
CHURN_NUMERIC = ["tenure_months", "monthly_spend", "support_tickets"]
CHURN_CATEGORICAL = {"plan": PLANS, "autopay": [True, False]}


def churn_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        tenure = int(rng.expovariate(1 / 20.0))
        spend = round(rng.uniform(8, 120), 2)
        plan = rng.choices(PLANS, weights=[5, 3, 2])[0]
        tickets = poisson(rng, 1.2) if rng.random() > 0.2 else None
        autopay = rng.random() < 0.55
        z = (-0.4 - 1.4 * (1 - math.exp(-tenure / 12.0)) + (0.9 if spend > 80 else 0.0)
             + {"basic": 0.3, "plus": 0.0, "premium": -0.5}[plan]
             + (0.35 * min(tickets, 5) if tickets is not None else 0.2) - 0.7 * autopay)
        rows.append({"tenure_months": tenure, "monthly_spend": spend, "plan": plan,
                     "support_tickets": tickets, "autopay": autopay, "churned": int(rng.random() < sigmoid(z))})
    return rows


def churn_value(r: dict, name: str):
    # Must match models/churn-risk/score.py: a missing support_tickets is -1, below every count.
    v = r[name]
    return -1.0 if v is None else float(v) if name in CHURN_NUMERIC else v


def train_churn(rows: list[dict], out: Path, *, rounds: int = 120, rate: float = 0.15, lam: float = 1.0,
                bins: int = 32) -> None:
    """Newton boosting of depth-1 trees (stumps) on log loss, with histogram split search."""
    ys = [r["churned"] for r in rows]
    n = len(rows)
    # Candidate thresholds per numeric feature: midpoints between distinct quantile values.
    split_points, bin_of = {}, {}
    for name in CHURN_NUMERIC:
        values = sorted({churn_value(r, name) for r in rows})
        if len(values) > bins:
            values = sorted({values[int(i * (len(values) - 1) / (bins - 1))] for i in range(bins)})
        cuts = [(a + b) / 2 for a, b in zip(values, values[1:])]
        split_points[name] = cuts
        bin_of[name] = [bisect.bisect_left(cuts, churn_value(r, name)) for r in rows]
    for name, levels in CHURN_CATEGORICAL.items():
        bin_of[name] = [levels.index(r[name]) for r in rows]

    prior = sum(ys) / n
    base = math.log(prior / (1 - prior))
    f = [base] * n
    stumps = []
    for _ in range(rounds):
        g, h = [], []
        for fi, y in zip(f, ys):
            p = sigmoid(fi)
            g.append(p - y)
            h.append(p * (1 - p))
        G, H = sum(g), sum(h)
        best = None
        for name in [*CHURN_NUMERIC, *CHURN_CATEGORICAL]:
            nb = len(split_points[name]) + 1 if name in split_points else len(CHURN_CATEGORICAL[name])
            gb, hb = [0.0] * nb, [0.0] * nb
            for b, gi, hi in zip(bin_of[name], g, h):
                gb[b] += gi
                hb[b] += hi
            if name in split_points:   # left = bins 0..k (x <= cut k), right = the rest
                candidates, gl, hl = [], 0.0, 0.0
                for k in range(nb - 1):
                    gl += gb[k]
                    hl += hb[k]
                    candidates.append((k, gl, hl))
            else:                      # one level against the others
                candidates = [(k, gb[k], hb[k]) for k in range(nb)]
            for k, gl, hl in candidates:
                gr, hr = G - gl, H - hl
                gain = gl * gl / (hl + lam) + gr * gr / (hr + lam) - G * G / (H + lam)
                if best is None or gain > best[0] + 1e-12:
                    best = (gain, name, k, -gl / (hl + lam) * rate, -gr / (hr + lam) * rate)
        _, name, k, left, right = best
        if name in split_points:
            stump = {"feature": name, "threshold": sig(split_points[name][k]), "left": sig(left), "right": sig(right)}
            goes_left = [b <= k for b in bin_of[name]]
        else:
            stump = {"feature": name, "equals": CHURN_CATEGORICAL[name][k], "left": sig(left), "right": sig(right)}
            goes_left = [b == k for b in bin_of[name]]
        stumps.append(stump)
        f = [fi + (stump["left"] if gl_ else stump["right"]) for fi, gl_ in zip(f, goes_left)]
    params = {
        "model": "gradient-boosted stumps on log loss, fitted by models/train.py",
        "note": "stump: x <= threshold (or x == equals) adds left, otherwise right; missing support_tickets is -1",
        "base": sig(base),
        "rounds": rounds,
        "learning_rate": rate,
        "training_rows": n,
        "stumps": stumps,
    }
    write_json(out / "params.json", params)


# -- major-gift: realtime, R, glm ---------------------------------------------------

RATINGS = ["A", "B", "C", "D", "E"]


def major_gift_rows(rng: random.Random, n: int) -> list[dict]:
    rating_effect = {"A": 1.6, "B": 0.9, "C": 0.3, "D": 0.0, "E": -0.4}
    rows = []
    for _ in range(n):
        age = rng.randint(25, 90)
        rating = rng.choices(RATINGS, weights=[1, 2, 3, 3, 2])[0]
        events = poisson(rng, 1.5)
        last_gift = round(rng.lognormvariate(5.5, 1.2), 2) if rng.random() > 0.25 else None
        volunteer = rng.random() < 0.2
        z = (-4.0 + 0.025 * age + rating_effect[rating] + 0.3 * events
             + (0.35 * math.log1p(last_gift) - 1.5 if last_gift is not None else -1.2) + 0.6 * volunteer)
        rows.append({"age": age, "wealth_rating": rating, "events_attended": events,
                     "last_gift_amount": last_gift, "volunteer": volunteer,
                     "major_gift": int(rng.random() < sigmoid(z))})
    return rows


# -- member-retention: batch, R, glm ------------------------------------------------

TIERS = ["individual", "family", "patron"]


def retention_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        years = round(rng.uniform(0, 30), 1)
        visits = poisson(rng, 4.0)
        tier = rng.choices(TIERS, weights=[6, 3, 1])[0]
        auto_renew = rng.random() < 0.4
        distance = round(rng.expovariate(1 / 25.0), 1) if rng.random() > 0.1 else None
        z = (0.2 + 0.05 * years + 0.25 * visits + {"individual": 0.0, "family": 0.4, "patron": 0.9}[tier]
             + 1.1 * auto_renew + (-0.02 * distance if distance is not None else -0.3))
        rows.append({"years_member": years, "visits_last_year": visits, "tier": tier,
                     "auto_renew": auto_renew, "distance_km": distance, "renewed": int(rng.random() < sigmoid(z))})
    return rows


def train_with_r(name: str, rows: list[dict], columns: list[str], out: Path) -> None:
    rscript = shutil.which("Rscript")
    if rscript is None:
        raise SystemExit(f"{name}: Rscript not found; install R (r-base-core, r-cran-jsonlite) to fit it")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.csv"
        write_csv(data, columns, rows)
        proc = subprocess.run([rscript, "--vanilla", str(MODELS / name / "train.R"), str(data), str(out / "params.json")],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: train.R failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")


# -- the four models ---------------------------------------------------------------

SPECS = {
    "donor-propensity": dict(seed=1101, rows=donor_rows, train=train_donor,
                             features=["net_worth", "gifts_last_year", "region", "years_since_first_gift", "board_member"],
                             label="donated"),
    "churn-risk": dict(seed=2202, rows=churn_rows, train=train_churn,
                       features=["tenure_months", "monthly_spend", "plan", "support_tickets", "autopay"],
                       label="churned"),
    "major-gift": dict(seed=3303, rows=major_gift_rows, train="r",
                       features=["age", "wealth_rating", "events_attended", "last_gift_amount", "volunteer"],
                       label="major_gift", id=("donor_id", "D-")),
    "member-retention": dict(seed=4404, rows=retention_rows, train="r",
                             features=["years_member", "visits_last_year", "tier", "auto_renew", "distance_km"],
                             label="renewed", id=("member_id", "M-")),
}


def build(name: str, out_root: Path) -> None:
    spec = SPECS[name]
    rng = random.Random(spec["seed"])
    rows = spec["rows"](rng, TRAIN_ROWS + SAMPLE_ROWS)
    train, sample = rows[:TRAIN_ROWS], rows[TRAIN_ROWS:]
    out = out_root / name
    out.mkdir(parents=True, exist_ok=True)
    columns = spec["features"]
    if "id" in spec:  # a passthrough column (model.yaml): an id per row, first, never a feature
        column, prefix = spec["id"]
        sample = [{column: f"{prefix}{TRAIN_ROWS + k:05d}", **row} for k, row in enumerate(sample)]
        columns = [column, *columns]
    write_csv(out / "sample.csv", columns, sample)
    if spec["train"] == "r":
        train_with_r(name, train, [*spec["features"], spec["label"]], out)
    else:
        spec["train"](train, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"models to rebuild (default: all of {', '.join(SPECS)})")
    ap.add_argument("--out", type=Path, default=MODELS,
                    help="write params.json and sample.csv under OUT/<model>/ (default: the models folder)")
    args = ap.parse_args(argv)
    unknown = [n for n in args.names if n not in SPECS]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; expected some of {', '.join(SPECS)}")
    for name in args.names or list(SPECS):
        build(name, args.out)
        print(f"{name}: wrote {args.out / name / 'params.json'} and sample.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
