"""The manifest: every class of error names the file, the line and the field."""
from __future__ import annotations

import textwrap

import pytest

from adapters.manifest import (
    ManifestError,
    load_manifest,
    parse_bytes,
    parse_duration,
    parse_manifest,
    semver_key,
)

GOOD = textwrap.dedent("""\
    name: donor-propensity
    version: 1.3.0
    kind: realtime
    language: r
    command: [Rscript, serve.R]
    features:
      - {name: net_worth, type: number}
      - {name: gifts_last_year, type: integer, required: false}
      - {name: region, type: string, allowed: [west, east, north, south]}
    score: {name: propensity, type: number}
    scaling: {min: 0, max: 5, target_concurrency: 8, idle_timeout: 60s}
    resources: {cpu: "1", memory: 1Gi}
    """)


def problems(text: str, **kw) -> list[tuple[str, int | None, str]]:
    with pytest.raises(ManifestError) as info:
        parse_manifest(text, file="models/x/model.yaml", check_files=False, **kw)
    err = info.value
    assert err.file == "models/x/model.yaml"
    assert str(err).startswith("models/x/model.yaml")
    return [(p.field, p.line, p.message) for p in err.problems]


def one(text: str) -> tuple[str, int | None, str]:
    found = problems(text)
    assert len(found) == 1, found
    return found[0]


def test_good_manifest_parses_with_defaults():
    m = parse_manifest(GOOD, check_files=False)
    assert m.name == "donor-propensity"
    assert m.feature_names == ["net_worth", "gifts_last_year", "region"]
    assert m.features[1].required is False
    assert m.scaling.idle_seconds == 60
    assert m.limits.max_rows == 10_000
    assert m.batch is None
    assert m.to_dict()["score"] == {"name": "propensity", "type": "number", "description": ""}


def test_batch_model_gets_default_timeout():
    text = GOOD.replace("kind: realtime", "kind: batch")
    m = parse_manifest(text, check_files=False)
    assert m.batch is not None and m.batch.timeout_seconds == 30 * 60


def test_unknown_key_names_line():
    field, line, msg = one(GOOD + "colour: red\n")
    assert (field, line) == ("colour", 13)
    assert "unknown key" in msg


def test_unknown_nested_key_names_path_and_line():
    text = GOOD.replace("{name: net_worth, type: number}", "{name: net_worth, type: number, reqired: false}")
    field, line, msg = one(text)
    assert (field, line) == ("features[0].reqired", 7)
    assert "unknown key" in msg


def test_missing_required_field():
    text = GOOD.replace("kind: realtime\n", "")
    field, line, msg = one(text)
    assert field == "kind" and "missing" in msg


@pytest.mark.parametrize("name", ["Donor", "donor_propensity", "-donor", "a" * 64, ""])
def test_name_must_be_dns_label(name):
    field, line, msg = one(GOOD.replace("name: donor-propensity", f"name: '{name}'"))
    assert (field, line) == ("name", 1)
    assert "DNS label" in msg


@pytest.mark.parametrize("version", ["1.3", "v1.3.0", "01.2.3", "latest"])
def test_version_must_be_semver(version):
    field, line, msg = one(GOOD.replace("version: 1.3.0", f"version: {version}"))
    assert (field, line) == ("version", 2)
    assert "semantic version" in msg


def test_unquoted_float_version_is_explained():
    field, _, msg = one(GOOD.replace("version: 1.3.0", "version: 1.3"))
    assert "quote it" in msg and "1.3" in msg


def test_kind_and_language_are_enumerations():
    found = problems(GOOD.replace("kind: realtime", "kind: stream").replace("language: r", "language: julia"))
    fields = {f: (line, msg) for f, line, msg in found}
    assert fields["kind"][0] == 3 and "'realtime'" in fields["kind"][1] and "stream" in fields["kind"][1]
    assert fields["language"][0] == 4 and "julia" in fields["language"][1]


def test_feature_type_must_be_known():
    text = GOOD.replace("{name: net_worth, type: number}", "{name: net_worth, type: float}")
    field, line, msg = one(text)
    assert (field, line) == ("features[0].type", 7)
    assert "'number'" in msg and "float" in msg


def test_allowed_values_must_match_type():
    text = GOOD.replace("allowed: [west, east, north, south]", "allowed: [west, 3]")
    field, line, msg = one(text)
    assert field == "features[2]" and line == 9
    assert "3" in msg and "string" in msg


def test_duplicate_feature_names():
    text = GOOD.replace("name: gifts_last_year", "name: net_worth")
    _, _, msg = one(text)
    assert "duplicate" in msg and "net_worth" in msg


def test_bad_feature_name():
    _, _, msg = one(GOOD.replace("name: net_worth", "name: 'net worth'"))
    assert "column name" in msg


def test_scaling_min_not_above_max():
    field, line, msg = one(GOOD.replace("{min: 0, max: 5", "{min: 6, max: 5"))
    assert field == "scaling" and line == 11
    assert "min (6) must not exceed max (5)" in msg


@pytest.mark.parametrize("bad", ["60", "1 minute", "60sec", "-5s"])
def test_durations_are_checked(bad):
    field, line, msg = one(GOOD.replace("idle_timeout: 60s", f"idle_timeout: '{bad}'"))
    assert (field, line) == ("scaling.idle_timeout", 11)
    assert "duration" in msg


def test_scaling_numbers_must_be_positive():
    field, _, msg = one(GOOD.replace("max: 5", "max: 0"))
    assert field == "scaling.max" and "greater than or equal to 1" in msg


def test_resources_are_quantities():
    found = problems(GOOD.replace('{cpu: "1", memory: 1Gi}', "{cpu: lots, memory: 1GB}"))
    fields = {f: msg for f, _, msg in found}
    assert "CPU quantity" in fields["resources.cpu"]
    assert "memory quantity" in fields["resources.memory"]


def test_batch_section_only_for_batch_models():
    field, line, msg = one(GOOD + "batch: {timeout: 30m}\n")
    assert "only batch models" in msg


def test_batch_timeout_checked():
    text = GOOD.replace("kind: realtime", "kind: batch") + "batch: {timeout: soon}\n"
    field, line, msg = one(text)
    assert (field, line) == ("batch.timeout", 13)


def test_command_must_be_a_list_of_strings():
    found = problems(GOOD.replace("command: [Rscript, serve.R]", "command: []"))
    assert found[0][0] == "command"
    field, _, msg = one(GOOD.replace("command: [Rscript, serve.R]", "command: Rscript serve.R"))
    assert field == "command" and "list" in msg


def test_not_yaml_names_line():
    field, line, msg = one(GOOD + "features: [unclosed\n")
    assert line is not None and "not valid YAML" in msg


def test_not_a_mapping():
    field, line, msg = one("- just\n- a list\n")
    assert "mapping" in msg


def test_every_problem_is_reported_at_once():
    text = GOOD.replace("kind: realtime", "kind: stream").replace("version: 1.3.0", "version: one") + "extra: 1\n"
    assert {f for f, _, _ in problems(text)} == {"kind", "version", "extra"}


def test_sample_resolved_relative_to_manifest(tmp_path, monkeypatch):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "sample.csv").write_text("net_worth,region\n1,west\n")
    (folder / "model.yaml").write_text(GOOD + "sample: sample.csv\n")
    monkeypatch.chdir(tmp_path.parent)  # not the manifest's folder
    m = load_manifest(folder)
    assert m.sample_path == (folder / "sample.csv").resolve()
    assert m.folder == folder.resolve()


def test_missing_sample_file_is_named(tmp_path):
    (tmp_path / "model.yaml").write_text(GOOD + "sample: nowhere.csv\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(tmp_path)
    p = info.value.problems[0]
    assert p.field == "sample" and p.line == 13 and "nowhere.csv" in p.message


def test_missing_manifest_file(tmp_path):
    with pytest.raises(ManifestError) as info:
        load_manifest(tmp_path)
    assert "no model.yaml" in str(info.value)


def test_units():
    assert parse_duration("250ms") == 0.25
    assert parse_duration("30m") == 1800
    assert parse_bytes("16Mi") == 16 * 2**20
    with pytest.raises(ValueError):
        parse_bytes("lots")


def test_semver_ordering():
    versions = ["1.10.0", "1.2.0", "1.2.0-rc.1", "0.9.9", "1.2.0-alpha"]
    assert sorted(versions, key=semver_key) == ["0.9.9", "1.2.0-alpha", "1.2.0-rc.1", "1.2.0", "1.10.0"]


# -- hostile manifests ------------------------------------------------------------------------

def test_alias_amplification_is_refused_small_and_fast():
    """Nine aliases per level, nine levels: 9**9 nodes if expanded. Refused by counting, not expanding."""
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        levels.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    text = GOOD + "\n".join(levels) + "\n"
    assert len(text.encode()) < 1200
    found = problems(text)
    assert len(found) == 1 and "expands to more than 10,000 nodes" in found[0][2]
    with pytest.raises(ManifestError) as info:
        parse_manifest(text, check_files=False)
    assert len(str(info.value)) < 500


def test_a_modest_alias_is_still_fine():
    text = GOOD.replace("resources: {cpu: \"1\", memory: 1Gi}", "resources: &r {cpu: \"1\", memory: 1Gi}")
    assert parse_manifest(text, check_files=False).resources.cpu == "1"


def test_duplicate_keys_are_refused_naming_the_key_and_line():
    text = GOOD + "version: 9.9.9\n"
    ((field, line, message),) = problems(text)
    assert "duplicate key 'version' (first on line 2)" in message and line == 13


def test_echoed_values_are_bounded():
    text = GOOD.replace("language: r", "language: " + "x" * 100_000)
    ((field, _, message),) = problems(text)
    assert field == "language" and len(message) < 400 and "100002 characters" in message


@pytest.mark.parametrize("sample", ["/etc/passwd", "../../etc/passwd", "~/.ssh/id_rsa", "data/../../x.csv"])
def test_sample_stays_inside_the_model_folder(tmp_path, sample):
    (tmp_path / "model.yaml").write_text(GOOD + f"sample: {sample}\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(tmp_path)
    (p,) = info.value.problems
    assert p.field == "sample" and "inside the model folder" in p.message


def test_a_sample_symlink_leading_outside_is_refused(tmp_path):
    (tmp_path / "model.yaml").write_text(GOOD + "sample: sample.csv\n")
    (tmp_path / "sample.csv").symlink_to("/etc/hostname")
    with pytest.raises(ManifestError) as info:
        load_manifest(tmp_path)
    assert "leads outside the model folder" in info.value.problems[0].message
    assert "/etc/hostname" not in str(info.value)


def test_a_manifest_that_is_not_utf8_or_too_big_names_the_file(tmp_path):
    (tmp_path / "model.yaml").write_bytes(GOOD.encode() + b"description: caf\xe9\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(tmp_path)
    (p,) = info.value.problems
    assert info.value.file.endswith("model.yaml") and "not UTF-8" in p.message and p.line == 13
    (tmp_path / "model.yaml").write_text(GOOD + "#" * (300 * 1024) + "\n")
    with pytest.raises(ManifestError, match="larger than 256 KiB"):
        load_manifest(tmp_path)


def test_yaml_merge_keys_are_refused_naming_the_line_and_field():
    """`<<: ...` brings keys in silently: written beside a key it also brings, a merge slipped
    past the duplicate-key check (the explicit key won, nothing said so)."""
    inline = GOOD.replace("scaling: {min: 0, max: 5,", "scaling: {<<: {max: 50}, min: 0, max: 5,")
    ((field, line, message),) = problems(inline)
    assert field == "scaling.<<" and line == 11 and "merge keys" in message
    anchored = GOOD.replace("resources: {cpu: \"1\", memory: 1Gi}",
                            "resources: &r {cpu: \"1\", memory: 1Gi}\nbatch:\n  <<: *r\n  timeout: 30m\n")
    ((field, line, message),) = problems(anchored)
    assert field == "batch.<<" and line == 14 and "merge keys" in message
    listed = GOOD.replace("  - {name: net_worth, type: number}", "  - {<<: {name: x}, name: net_worth, type: number}")
    ((field, line, _),) = problems(listed)
    assert field == "features[0].<<" and line == 7


def test_an_alias_used_as_a_key_cannot_smuggle_a_duplicate():
    text = "k: &k version\n" + GOOD + "*k : 9.9.9\n"
    found = problems(text)
    assert any("duplicate key 'version'" in message for _, _, message in found), found


# -- passthrough columns ------------------------------------------------------------------

def test_passthrough_bare_names_and_items():
    m = parse_manifest(GOOD + "passthrough:\n  - customer_id\n  - {name: batch_no, type: integer, required: false}\n",
                       check_files=False)
    assert m.passthrough_names == ["customer_id", "batch_no"]
    assert (m.passthrough[0].type, m.passthrough[0].required) == ("string", True)   # a bare name's defaults
    assert (m.passthrough[1].type, m.passthrough[1].required) == ("integer", False)
    assert m.to_dict()["passthrough"] == [{"name": "customer_id", "type": "string", "required": True},
                                          {"name": "batch_no", "type": "integer", "required": False}]
    assert parse_manifest(GOOD, check_files=False).passthrough == []
    assert "passthrough" not in parse_manifest(GOOD, check_files=False).to_dict()  # as before them


@pytest.mark.parametrize("items, field, line, words", [
    ("  - customer_id\n  - net_worth\n", "passthrough[1]", 15, "'net_worth' is also a feature"),
    ("  - {name: propensity}\n", "passthrough[0]", 14, "'propensity' is the score's name"),
    ("  - id\n  - id\n", "passthrough[1]", 15, "'id' is declared twice"),
    ("  - {name: id, type: text}\n", "passthrough[0].type", 14, "got 'text'"),
    ("  - {name: id, allowed: [a]}\n", "passthrough[0].allowed", 14, "unknown key"),
    ("  - 1id\n", "passthrough[0].name", 14, "expected a column name"),
    ("".join(f"  - c{i}\n" for i in range(17)), "passthrough", 13, "at most 16 passthrough columns; got 17"),
])
def test_passthrough_problems_name_field_and_line(items, field, line, words):
    found = one(GOOD + "passthrough:\n" + items)
    assert found[0] == field and found[1] == line and words in found[2], found


def test_sixteen_passthrough_columns_are_fine():
    m = parse_manifest(GOOD + "passthrough: [" + ", ".join(f"c{i}" for i in range(16)) + "]\n", check_files=False)
    assert len(m.passthrough) == 16
