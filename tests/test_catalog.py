"""The catalog: owner and labels in the manifest, `GET /api/models` filtered by label selectors,
owner and text (paged, ETag per filter), the drift flag on each row, `modelplane ls` filters and
the console's Models page searching, filtering and paging server-side.

A real control service (front door + Flask API) with the local runtime and real fixture models
registered from a models folder; drift comes from the real score monitor fed real scores.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from urllib.parse import unquote

import pytest

from adapters.manifest import ManifestError, parse_manifest
from control.cli import main
from control.runtime.base import ProxyResponse
from control_helpers import FIXTURES, TOKEN, api, running, settings_for, wait_until, token_file

# name -> (fixture, owner, labels, description)
CATALOG = {
    "acme-donor": ("echo-rt", "fundraising-analytics", {"customer": "acme", "team": "fundraising"},
                   "How likely a contact is to give (Donor propensity)."),
    "acme-churn": ("sum-batch", "membership-analytics", {"customer": "acme", "team": "membership", "tier": "gold"},
                   "Probability that a subscriber cancels."),
    "globex-gift": ("echo-rt", "fundraising-analytics", {"customer": "globex", "team": "fundraising"},
                    "Major gift likelihood."),
    "initech-renewal": ("sum-batch", "", {}, "Membership renewal, no owner, no labels."),
    "umbrella-score": ("echo-rt", "Umbrella DONOR desk", {"customer": "umbrella", "segment": "DonorsPlus"},
                       "A score."),
}


def write_model(models_dir: Path, name: str) -> None:
    fixture, owner, labels, description = CATALOG[name]
    folder = Path(shutil.copytree(FIXTURES / fixture, models_dir / name))
    text = (folder / "model.yaml").read_text()
    lines = [line for line in text.splitlines() if not line.startswith(("name:", "description:"))]
    extra = [f"name: {name}", f"description: {description}"]
    if owner:
        extra.append(f"owner: {owner}")
    if labels:
        extra.append("labels: {" + ", ".join(f"{k}: {v}" for k, v in labels.items()) + "}")
    (folder / "model.yaml").write_text("\n".join(extra + lines) + "\n")


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("catalog")
    settings = settings_for(tmp, token=TOKEN)
    for name in CATALOG:
        write_model(settings.models_dir, name)
    with running(settings) as server:
        wait_until(lambda: len(api.get(f"{server.url}/api/models").json()) == len(CATALOG), 30,
                   what="the catalog registered")
        yield server


def names(server, **params) -> list[str]:
    r = api.get(f"{server.url}/api/models", params=params)
    assert r.status_code == 200, r.text
    assert r.headers["X-Total-Count"] == str(len(r.json()))
    return [m["name"] for m in r.json()]


# -- the manifest ------------------------------------------------------------------------------

BASE = """\
name: m
version: 1.0.0
kind: realtime
language: python
command: [python3, model.py]
description: d
features:
  - {name: x, type: number}
"""


def problem(extra: str):
    with pytest.raises(ManifestError) as e:
        parse_manifest(BASE + extra, file="model.yaml")
    (p,) = e.value.problems
    return p


def test_owner_and_labels_are_read_and_default_empty():
    plain = parse_manifest(BASE, file="model.yaml")
    assert plain.owner == "" and plain.labels == {}
    m = parse_manifest(BASE + "owner: fundraising-analytics\nlabels: {customer: acme, example.com/team: a.b_c-d, "
                       "empty: ''}\n", file="model.yaml")
    assert m.owner == "fundraising-analytics"
    assert m.labels == {"customer": "acme", "example.com/team": "a.b_c-d", "empty": ""}
    assert list(m.to_dict())[list(m.to_dict()).index("description") + 1:][:2] == ["owner", "labels"]


@pytest.mark.parametrize("extra, field, words", [
    ("owner: " + "x" * 129 + "\n", "owner", "at most 128"),
    ('owner: "team\\u0007bell"\n', "owner", "control characters"),
    ("owner: [a]\n", "owner", "string"),
    ("labels: [customer]\n", "labels", "dictionary"),
    ("labels: {modelplane.dev/model: x}\n", "labels", "modelplane.dev/"),
    ("labels: {'bad key': x}\n", "labels", "label key"),
    ("labels: {" + "k" * 64 + ": x}\n", "labels", "label key"),
    ("labels: {Example.com/team: x}\n", "labels", "prefix"),
    ("labels: {customer: -acme}\n", "labels", "label value"),
    ("labels: {customer: " + "a" * 64 + "}\n", "labels", "label value"),
    ("labels: {customer: 42}\n", "labels", "string value"),
    ("labels: {" + ", ".join(f"k{i}: v" for i in range(65)) + "}\n", "labels", "at most 64"),
])
def test_bad_owner_or_labels_name_the_field(extra, field, words):
    p = problem(extra)
    assert p.field == field and words in p.message, p
    assert p.line == 9


# -- the list ------------------------------------------------------------------------------------

def test_rows_carry_owner_labels_and_an_empty_drift_list(catalog):
    rows = {m["name"]: m for m in api.get(f"{catalog.url}/api/models").json()}
    assert rows["acme-churn"]["owner"] == "membership-analytics"
    assert rows["acme-churn"]["labels"] == {"customer": "acme", "team": "membership", "tier": "gold"}
    assert rows["initech-renewal"]["owner"] == "" and rows["initech-renewal"]["labels"] == {}
    assert all(m["drifted"] == [] for m in rows.values())


def test_label_selectors_equal_not_equal_and_exists(catalog):
    assert names(catalog, label="customer=acme") == ["acme-churn", "acme-donor"]
    assert names(catalog, label="customer==globex") == ["globex-gift"]
    # != also matches the models without the label, as in Kubernetes
    assert names(catalog, label="customer!=acme") == ["globex-gift", "initech-renewal", "umbrella-score"]
    assert names(catalog, label="tier") == ["acme-churn"]
    assert names(catalog, label="team") == ["acme-churn", "acme-donor", "globex-gift"]
    assert names(catalog, label="customer=nobody") == []
    # repeated: every selector must match
    assert names(catalog, label=["customer=acme", "team=fundraising"]) == ["acme-donor"]
    assert names(catalog, label=["team", "customer!=acme"]) == ["globex-gift"]


def test_owner_is_exact_and_q_searches_name_description_owner_and_label_values(catalog):
    assert names(catalog, owner="fundraising-analytics") == ["acme-donor", "globex-gift"]
    assert names(catalog, owner="fundraising") == []
    assert names(catalog, q="DONOR") == ["acme-donor", "umbrella-score"]      # description; owner
    assert names(catalog, q="donorsplus") == ["umbrella-score"]               # a label value
    assert names(catalog, q="globex") == ["globex-gift"]                      # name and label value
    assert names(catalog, q="membership") == ["acme-churn", "initech-renewal"]  # owner; description
    assert names(catalog, q="segment") == []                                  # label keys are not searched
    # everything together
    assert names(catalog, q="donor", owner="fundraising-analytics", label="customer=acme") == ["acme-donor"]
    assert names(catalog, q="donor", label="customer=globex") == []


def test_filtered_pages_link_with_the_filters_count_matches_and_tag_each_filter(catalog):
    url = f"{catalog.url}/api/models"
    first = api.get(url, params={"label": ["customer!=nobody", "customer"], "q": "a", "limit": 2})
    assert first.status_code == 200
    assert [m["name"] for m in first.json()] == ["acme-churn", "acme-donor"]
    assert first.headers["X-Total-Count"] == "4"       # all matches, not the page
    link = first.headers["Link"]
    assert link.endswith('>; rel="next"')
    target = link[1:link.index(">")]
    assert "label=customer%21%3Dnobody" in target and "label=customer&" in target and "q=a" in target
    second = api.get(f"{catalog.url}{target}")
    assert [m["name"] for m in second.json()] == ["globex-gift", "umbrella-score"]
    assert second.headers["X-Total-Count"] == "4" and "Link" not in second.headers
    assert unquote(target).count("label=") == 2
    # an ETag per filter (and per page); If-None-Match answers 304 for the same filter only
    tags = {api.get(url, params=p).headers["ETag"] for p in
            ({}, {"label": "customer=acme"}, {"label": "customer=globex"}, {"q": "acme"}, {"owner": "x"},
             {"label": "customer=acme", "limit": 1})}
    assert len(tags) == 6
    acme = api.get(url, params={"label": "customer=acme"})
    same = api.get(url, params={"label": "customer=acme"}, headers={"If-None-Match": acme.headers["ETag"]})
    assert same.status_code == 304 and same.content == b"" and same.headers["X-Total-Count"] == "2"
    other = api.get(url, params={"label": "customer=globex"}, headers={"If-None-Match": acme.headers["ETag"]})
    assert other.status_code == 200 and [m["name"] for m in other.json()] == ["globex-gift"]
    # the rows of a filtered answer are the very rows of the whole list
    whole = {m["name"]: m for m in api.get(url).json()}
    assert acme.json() == [whole["acme-churn"], whole["acme-donor"]]


@pytest.mark.parametrize("params", [{"label": "bad key=x"}, {"label": "customer=-x"}, {"label": ""},
                                    {"label": "=acme"}, {"label": ["customer=acme", "a/b/c"]},
                                    {"q": "x" * 201}])
def test_a_bad_selector_or_search_is_a_400_naming_the_parameter(catalog, params):
    r = api.get(f"{catalog.url}/api/models", params=params)
    assert r.status_code == 400, r.text
    assert ("label" if "label" in params else "q") in r.json()["error"]


def test_a_drifted_version_is_flagged_on_its_row_and_changes_the_tag(catalog):
    monitor = catalog.plane.monitor
    before = api.get(f"{catalog.url}/api/models", params={"label": "customer=umbrella"})
    assert before.json()[0]["drifted"] == []
    rng = random.Random(5)
    monitor.set_reference("umbrella-score", "1.0.0", [rng.gauss(0, 1) for _ in range(500)])
    shifted = [rng.gauss(3, 1) for _ in range(300)]
    body = ('{"model": "umbrella-score", "version": "1.0.0", "scores": [%s]}' % ",".join(map(str, shifted))).encode()
    monitor.observe("umbrella-score", ProxyResponse(200, {"Content-Type": "application/json"}, body))
    wait_until(lambda: monitor.flags().get("umbrella-score"), 10, what="the drift flag")
    after = api.get(f"{catalog.url}/api/models", params={"label": "customer=umbrella"},
                    headers={"If-None-Match": before.headers["ETag"]})
    assert after.status_code == 200 and after.headers["ETag"] != before.headers["ETag"]
    assert after.json()[0]["drifted"] == ["1.0.0"]
    rows = {m["name"]: m["drifted"] for m in api.get(f"{catalog.url}/api/models").json()}
    assert rows["umbrella-score"] == ["1.0.0"] and rows["acme-donor"] == []
    # the CLI marks it
    assert main(["ls", "--label", "customer=umbrella", "--url", catalog.url, "--token-file", token_file(TOKEN)]) == 0


# -- the CLI -----------------------------------------------------------------------------------------

def ls(server, capsys, *args) -> list[list[str]]:
    capsys.readouterr()
    assert main(["ls", *args, "--url", server.url, "--token-file", token_file(TOKEN)]) == 0
    return [line.split() for line in capsys.readouterr().out.splitlines()]


def test_cli_ls_filters_by_label_search_and_owner_and_shows_owner_and_labels(catalog, capsys):
    lines = ls(catalog, capsys, "--label", "customer=acme", "--search", "donor")
    header, rows = lines[0], lines[1:]
    assert header[:8] == ["NAME", "KIND", "LANGUAGE", "VERSION", "STATUS", "REPLICAS", "OWNER", "LABELS"]
    assert [r[0] for r in rows] == ["acme-donor"]
    assert rows[0][6:8] == ["fundraising-analytics", "customer=acme,team=fundraising"]
    assert [r[0] for r in ls(catalog, capsys, "--label", "customer=acme", "--label", "tier")[1:]] == ["acme-churn"]
    assert [r[0] for r in ls(catalog, capsys, "--owner", "membership-analytics")[1:]] == ["acme-churn"]
    assert ls(catalog, capsys, "--search", "no-such-thing") == [["no", "models", "match"]]
    limited = ls(catalog, capsys, "--label", "customer", "--limit", "2")
    assert [r[0] for r in limited[1:3]] == ["acme-churn", "acme-donor"]
    assert limited[-1][:3] == ["2", "of", "4"]


def test_cli_ls_marks_drift_and_refuses_a_bad_selector(catalog, capsys):
    monitor = catalog.plane.monitor
    if not monitor.flags().get("umbrella-score"):
        test_a_drifted_version_is_flagged_on_its_row_and_changes_the_tag(catalog)
    lines = ls(catalog, capsys, "--search", "umbrella")
    assert "DRIFT" in lines[0]
    assert lines[1][lines[0].index("DRIFT")] == "yes(1.0.0)"
    capsys.readouterr()
    assert main(["ls", "--label", "bad key", "--url", catalog.url, "--token-file", token_file(TOKEN)]) == 1
    assert "label" in capsys.readouterr().err


# -- the console's Models page -------------------------------------------------------------------

FILLERS = 60  # more than a page of 50


@pytest.fixture(scope="module")
def big_catalog(tmp_path_factory):
    """The catalog plus FILLERS batch models labelled customer=filler: more than one page."""
    tmp = tmp_path_factory.mktemp("big-catalog")
    settings = settings_for(tmp, token=TOKEN)
    for name in CATALOG:
        write_model(settings.models_dir, name)
    for i in range(FILLERS):
        folder = Path(shutil.copytree(FIXTURES / "sum-batch", settings.models_dir / f"filler-{i:03d}"))
        text = (folder / "model.yaml").read_text().replace("name: sum-batch", f"name: filler-{i:03d}")
        (folder / "model.yaml").write_text(text + "owner: bulk\nlabels: {customer: filler}\n")
    with running(settings) as server:
        wait_until(lambda: api.get(f"{server.url}/api/models", params={"limit": 1}).headers.get("X-Total-Count")
                   == str(len(CATALOG) + FILLERS), 60, what="the catalog registered")
        yield server


@pytest.fixture
def models_page(big_catalog, monkeypatch, tmp_path):
    from streamlit import config
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MODELPLANE_URL", big_catalog.url)
    monkeypatch.setenv("MODELPLANE_TOKEN", TOKEN)
    monkeypatch.setenv("MODELPLANE_STATE_DIR", str(tmp_path / "no-state"))
    config.set_option("server.address", "127.0.0.1")
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "console" / "app.py"), default_timeout=60)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def shown(at) -> list[str]:
    assert not at.exception, [e.value for e in at.exception]
    (table,) = [d.value for d in at.dataframe if "Model" in d.value.columns]
    return list(table["Model"])


def metric_value(at, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


@pytest.mark.slow
def test_console_models_page_searches_filters_and_pages_on_the_server(models_page, big_catalog):
    at = models_page
    total = len(CATALOG) + FILLERS
    first = shown(at)
    assert len(first) == 50 and first == sorted(first)              # one page, not all 65
    assert metric_value(at, "Models") == f"{total:,}"
    at.button(key="models_next").click().run()
    second = shown(at)
    assert len(second) == total - 50 and second[0] > first[-1]
    assert at.button(key="models_next").disabled
    at.button(key="models_prev").click().run()
    assert shown(at) == first
    # search: the server answers, the page shows only the matches
    at.text_input(key="models_q").input("donor").run()
    assert shown(at) == ["acme-donor", "umbrella-score"]
    assert metric_value(at, "Matching") == "2"
    # label selectors (spaces or commas between them) and the owner
    at.text_input(key="models_q").input("").run()
    at.text_input(key="models_labels").input("customer=acme, tier").run()
    assert shown(at) == ["acme-churn"]
    at.text_input(key="models_labels").input("team").run()
    at.text_input(key="models_owner").input("fundraising-analytics").run()
    frame = next(d.value for d in at.dataframe if "Model" in d.value.columns).set_index("Model")
    assert list(frame.index) == ["acme-donor", "globex-gift"]
    assert frame.loc["acme-donor", "Owner"] == "fundraising-analytics"
    assert frame.loc["acme-donor", "Labels"] == "customer=acme, team=fundraising"
    # a filter starts again at page 1; a bad selector is a message, not a traceback
    at.text_input(key="models_owner").input("").run()
    at.text_input(key="models_labels").input("customer=-acme").run()
    assert not at.exception and any("label" in w.value for w in at.warning)
    at.text_input(key="models_labels").input("customer=nobody").run()
    assert any("No model matches" in i.value for i in at.info)


@pytest.mark.slow
def test_console_models_page_flags_drift_and_shows_no_none_for_missing_latency(models_page, big_catalog):
    monitor = big_catalog.plane.monitor
    rng = random.Random(11)
    monitor.set_reference("globex-gift", "1.0.0", [rng.gauss(0, 1) for _ in range(500)])
    body = ('{"model": "globex-gift", "version": "1.0.0", "scores": [%s]}'
            % ",".join(str(rng.gauss(4, 1)) for _ in range(300))).encode()
    monitor.observe("globex-gift", ProxyResponse(200, {"Content-Type": "application/json"}, body))
    wait_until(lambda: monitor.flags().get("globex-gift"), 10, what="the drift flag")
    at = models_page
    at.text_input(key="models_q").input("globex").run()
    frame = next(d.value for d in at.dataframe if "Model" in d.value.columns).set_index("Model")
    # drift and an error share the table's "Notes" cell (the table fits the page's width)
    assert frame.loc["globex-gift", "Notes"] == "drifted (1.0.0)"
    assert metric_value(at, "Drifted") == "1"
    assert any("globex-gift" in w.value for w in at.warning)
    # a model nobody called has no latency: a number column with a gap (shown as a dash), never None
    assert frame["p50 (ms)"].dtype.kind == "f" and frame["p50 (ms)"].isna().all()
    assert frame["Requests"].dtype.kind == "f"


def test_kind_filters_the_list_and_travels_in_the_next_link(catalog):
    server = catalog
    everything = api.get(f"{server.url}/api/models").json()
    for kind in ("batch", "realtime"):
        r = api.get(f"{server.url}/api/models", params={"kind": kind})
        assert r.status_code == 200
        assert [m["name"] for m in r.json()] == [m["name"] for m in everything if m["kind"] == kind]
        assert r.headers["X-Total-Count"] == str(len(r.json()))
    kinds = {m["kind"] for m in everything}
    assert kinds == {"realtime", "batch"}, kinds   # the catalog has both, so the filter can fail
    kind = max(kinds, key=lambda k: sum(m["kind"] == k for m in everything))
    r = api.get(f"{server.url}/api/models", params={"kind": kind, "limit": 1})
    assert f"kind={kind}" in r.headers["Link"]
    r = api.get(f"{server.url}/api/models", params={"kind": "streaming"})
    assert r.status_code == 400 and "kind" in r.json()["error"]


def test_a_list_rebuilt_for_the_models_that_changed_answers_as_one_built_whole():
    """ModelList patches its last snapshot where the runtime handed back new ModelInfo objects
    (the cluster runtime's watch cache keeps the others): the body, the ETag, pages and every
    filter (those asked before the change too) answer exactly as a snapshot built from scratch."""
    import types

    from control.api.models import Filter, ModelList, Snapshot
    from control.runtime.base import ModelInfo

    rng = random.Random(7)

    def info(i, status="idle"):
        return ModelInfo(name=f"m-{i:04d}", kind="realtime" if i % 3 else "batch", language="python", version="1.0.0",
                         status=status, owner=f"team-{i % 4}", labels={"team": f"t{i % 5}", "tier": "gold" if i % 7 else "x"},
                         description=f"model {i}")

    models = [info(i) for i in range(300)]
    runtime = types.SimpleNamespace(models=lambda: list(models), models_generation=lambda: generation[0])
    generation = [0]
    plane = types.SimpleNamespace(runtime=runtime, failed={}, monitor=types.SimpleNamespace(generation=0, flags=dict),
                                  failed_info=None)
    listing = ModelList(plane)
    filters = [Filter(), Filter(selectors=(("team", "=", "t1"),)), Filter(owner="team-2"), Filter(q="model 1"),
               Filter(kind="batch", selectors=(("tier", "!=", "x"),))]
    for wanted in filters:   # asked before the changes: their matches are carried over
        listing.current().answer(wanted, None, 50)
    for round_ in range(5):
        for i in rng.sample(range(len(models)), 7):
            models[i] = info(i, status=rng.choice(["ready", "starting", "failed-and-longer"]))
            if rng.random() < 0.3:
                models[i].labels = {"team": "t1", "tier": "x"}
        generation[0] += 1
        patched = listing.current()
        whole = Snapshot([m.to_json() | {"drifted": []} for m in models])
        assert (patched.body, patched.etag, patched.spans) == (whole.body, whole.etag, whole.spans)
        for wanted in filters:
            for after, limit in ((None, None), (None, 50), ("m-0100", 20)):
                assert patched.answer(wanted, after, limit) == whole.answer(wanted, after, limit), (round_, wanted)
