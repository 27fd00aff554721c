"""The model manifest (`model.yaml`): the one file a data scientist writes besides the model.

Strict by design: unknown keys, wrong types and inconsistent values are errors that name
the file, the line, the field path and what was expected, so a pull request fails with a
message its author can act on.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

MANIFEST_FILE = "model.yaml"

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
#: A Kubernetes label's name (the part after an optional prefix and '/') and a non-empty value.
LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
#: A label key's optional prefix: a DNS subdomain.
LABEL_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
#: Label keys under this prefix are modelplane's own (they say which model and version an object is).
RESERVED_LABEL_PREFIX = "modelplane.dev/"
MAX_LABELS = 64
MAX_OWNER = 128
FEATURE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
CPU_QUANTITY = re.compile(r"^(\d+(\.\d+)?|\d+m)$")
MEMORY_QUANTITY = re.compile(r"^\d+(\.\d+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_BYTE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
               "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}

FeatureType = Literal["number", "integer", "string", "boolean"]


def parse_duration(text: str) -> float:
    """`60s`, `30m`, `1.5h`, `250ms` -> seconds."""
    m = DURATION.match(str(text).strip())
    if not m:
        raise ValueError(f"expected a duration such as 250ms, 60s, 30m or 2h; got {text!r}")
    return float(m.group(1)) * _UNIT_SECONDS[m.group(2)]


def parse_bytes(text: str | int) -> int:
    """`10Mi`, `1G`, `512` -> bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = re.match(r"^(\d+)(Ki|Mi|Gi|Ti|K|M|G|T)?$", str(text).strip())
    if not m:
        raise ValueError(f"expected a size such as 512Ki, 10Mi or 1Gi; got {text!r}")
    return int(m.group(1)) * _BYTE_UNITS[m.group(2) or ""]


def semver_key(version: str) -> tuple:
    """Sort key ordering versions as semver does (a pre-release sorts before its release)."""
    m = SEMVER.match(version)
    if not m:
        return (0, 0, 0, 0, version)
    major, minor, patch, pre = int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4)
    if pre is None:
        return (major, minor, patch, 1, ())
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    return (major, minor, patch, 0, parts)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Feature(_Strict):
    """One input column."""

    name: str = Field(description="Column name, as it appears in rows and CSV headers.")
    type: FeatureType = Field(description="number | integer | string | boolean")
    required: bool = Field(True, description="A missing or null value is an error when true.")
    allowed: Optional[list[Any]] = Field(None, description="The only values accepted, if set.")
    description: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _column_name(v)

    @model_validator(mode="after")
    def _allowed_match_type(self) -> "Feature":
        if self.allowed is None:
            return self
        if not self.allowed:
            raise ValueError("allowed: expected at least one value (omit 'allowed' to accept any)")
        for value in self.allowed:
            if not value_has_type(value, self.type):
                raise ValueError(f"allowed: value {value!r} is not of type {self.type}")
        return self


#: Most passthrough columns a manifest may declare.
MAX_PASSTHROUGH = 16


class Passthrough(_Strict):
    """A column that identifies a row (a customer's id): accepted and checked like a feature, never
    sent to the model, and given back beside each score."""

    name: str = Field(description="Column name, as it appears in rows and CSV headers.")
    type: FeatureType = Field("string", description="number | integer | string | boolean")
    required: bool = Field(True, description="A missing or null value is an error when true.")

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _column_name(v)

    @property
    def allowed(self) -> None:
        """Passthrough columns take any value of their type (what `adapters.schema` asks of a column)."""
        return None


def _column_name(v: str) -> str:
    if not FEATURE_NAME.match(v):
        raise ValueError(
            f"expected a column name of letters, digits, '_' or '.', not starting with a digit; got {_short(v)}")
    return v


def value_has_type(value: Any, type_: str) -> bool:
    if type_ == "string":
        return isinstance(value, str)
    if type_ == "boolean":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if type_ == "integer":
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    return isinstance(value, (int, float)) and math.isfinite(value)


class Score(_Strict):
    name: str = Field("score", description="Name of the output column.")
    type: Literal["number"] = "number"
    description: str = ""


class Scaling(_Strict):
    min: int = Field(0, ge=0, description="Replicas kept warm; 0 allows scale to zero.")
    max: int = Field(5, ge=1, description="Most replicas.")
    target_concurrency: int = Field(8, ge=1, description="In-flight requests per replica before scaling out.")
    idle_timeout: str = Field("60s", description="Idle time before scaling in (and to zero).")

    @field_validator("idle_timeout")
    @classmethod
    def _duration(cls, v: str) -> str:
        parse_duration(v)
        return v

    @property
    def idle_seconds(self) -> float:
        return parse_duration(self.idle_timeout)

    @model_validator(mode="after")
    def _min_le_max(self) -> "Scaling":
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


class Resources(_Strict):
    cpu: str = Field("1", description="Kubernetes CPU quantity, e.g. 500m or 2.")
    memory: str = Field("1Gi", description="Kubernetes memory quantity, e.g. 512Mi.")

    @field_validator("cpu", mode="before")
    @classmethod
    def _cpu(cls, v: Any) -> str:
        v = str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
        if not isinstance(v, str) or not CPU_QUANTITY.match(v):
            raise ValueError(f"expected a CPU quantity such as 500m, 1 or 2.5; got {_short(v)}")
        return v

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: str) -> str:
        if not MEMORY_QUANTITY.match(v):
            raise ValueError(f"expected a memory quantity such as 512Mi or 2Gi; got {_short(v)}")
        return v


class Batch(_Strict):
    timeout: str = Field("30m", description="Longest a job may run before it is stopped and failed.")

    @field_validator("timeout")
    @classmethod
    def _duration(cls, v: str) -> str:
        parse_duration(v)
        return v

    @property
    def timeout_seconds(self) -> float:
        return parse_duration(self.timeout)


class Limits(_Strict):
    """Per-request limits the adapter enforces for a realtime model."""

    timeout: str = Field("30s", description="Longest the model may take to answer one request.")
    max_rows: int = Field(10_000, ge=1, description="Most rows in one request.")
    max_body: str = Field("16Mi", description="Largest request body.")

    @field_validator("timeout")
    @classmethod
    def _duration(cls, v: str) -> str:
        parse_duration(v)
        return v

    @field_validator("max_body")
    @classmethod
    def _size(cls, v: str) -> str:
        parse_bytes(v)
        return v

    @property
    def timeout_seconds(self) -> float:
        return parse_duration(self.timeout)

    @property
    def max_body_bytes(self) -> int:
        return parse_bytes(self.max_body)


class Monitoring(_Strict):
    """Score monitoring: each version's recent scores against a reference distribution."""

    reference_size: int = Field(1000, ge=100, le=100_000,
                                description="Scores a reference distribution needs (the stated minimum): a realtime "
                                            "version's first N scores, a batch version's jobs until they hold "
                                            "N (unless a reference dataset is set).")
    window: int = Field(1000, ge=100, le=100_000, description="Recent scores kept for the rolling histogram "
                                                             "and the drift figures.")
    drift_threshold: float = Field(0.25, gt=0, le=100, allow_inf_nan=False,
                                   description="PSI of recent scores against the reference above which the "
                                               "version is flagged as drifted.")


class Manifest(_Strict):
    """A model's `model.yaml`."""

    name: str = Field(description="Lowercase DNS label, unique in the plane.")
    version: str = Field(description="Semantic version; every deploy is a new immutable version.")
    kind: Literal["realtime", "batch"]
    language: Literal["r", "python", "other"]
    command: list[str] = Field(min_length=1, description="How the model starts, run inside its folder.")
    features: list[Feature] = Field(min_length=1)
    score: Score = Score()
    passthrough: list[Passthrough] = Field(
        default_factory=list, description="Columns that identify a row (e.g. [customer_id]): checked like "
                                          "features, never sent to the model, given back beside each score.")
    sample: Optional[str] = Field(None, description="A few real rows, relative to the manifest.")
    description: str = ""
    owner: str = Field("", description="Who answers for the model (a team or a person); searchable.")
    labels: dict[str, str] = Field(default_factory=dict,
                                   description="Kubernetes-style labels, e.g. {customer: acme, team: analytics}; "
                                               "what the catalog filters on (`?label=customer=acme`).")
    scaling: Scaling = Scaling()
    resources: Resources = Resources()
    limits: Limits = Limits()
    batch: Optional[Batch] = None
    visibility: Literal["cluster", "public"] = Field(
        "cluster", description="realtime on a cluster: `cluster` (reached through the control service, "
                               "cluster-local on Knative) or `public` (Knative also gives it an external URL).")
    monitoring: Monitoring = Monitoring()

    _folder: Path = PrivateAttr(default=Path("."))
    _file: Path = PrivateAttr(default=Path(MANIFEST_FILE))

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not DNS_LABEL.match(v):
            raise ValueError(
                f"expected a lowercase DNS label (a-z, 0-9, '-', at most 63 characters, "
                f"starting and ending alphanumeric); got {_short(v)}")
        return v

    @field_validator("owner")
    @classmethod
    def _owner(cls, v: str) -> str:
        if len(v) > MAX_OWNER:
            raise ValueError(f"expected at most {MAX_OWNER} characters; got {len(v)}")
        if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in v):
            raise ValueError(f"expected no control characters; got {_short(v)}")
        return v

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, v: Any) -> Any:
        if v is None:
            return {}
        if not isinstance(v, dict):
            return v  # pydantic says what was expected
        if len(v) > MAX_LABELS:
            raise ValueError(f"expected at most {MAX_LABELS} labels; got {len(v)}")
        for key, value in v.items():
            problem = label_key_problem(key) if isinstance(key, str) else f"expected a string key; got {_short(key)}"
            if problem is None and key.startswith(RESERVED_LABEL_PREFIX):
                problem = f"label keys under {RESERVED_LABEL_PREFIX} are modelplane's own; got {_short(key)}"
            if problem is None:
                if not isinstance(value, str):
                    problem = f"{key}: expected a string value (quote numbers and booleans in YAML); got {_short(value)}"
                elif value and not (len(value) <= 63 and LABEL_NAME.match(value)):
                    problem = (f"{key}: expected a label value (at most 63 of A-Z, a-z, 0-9, '-', '_', '.', starting "
                               f"and ending alphanumeric) or empty; got {_short(value)}")
            if problem is not None:
                raise ValueError(problem)
        return v

    @field_validator("passthrough", mode="before")
    @classmethod
    def _passthrough_count(cls, v: Any) -> Any:
        if v is None:
            return []
        if isinstance(v, list) and len(v) > MAX_PASSTHROUGH:
            raise ValueError(f"expected at most {MAX_PASSTHROUGH} passthrough columns; got {len(v)}")
        return v

    @field_validator("passthrough")
    @classmethod
    def _passthrough_names(cls, v: list[Passthrough], info: ValidationInfo) -> list[Passthrough]:
        features = {f.name for f in info.data.get("features") or []}
        score = info.data.get("score")
        seen: set[str] = set()
        for i, p in enumerate(v):
            if p.name in features:
                raise ValueError(f"[{i}] {p.name!r} is also a feature: a passthrough column is never sent to "
                                 "the model, so it cannot be one of its features")
            if score is not None and p.name == score.name:
                raise ValueError(f"[{i}] {p.name!r} is the score's name: the answer could not hold both")
            if p.name in seen:
                raise ValueError(f"[{i}] {p.name!r} is declared twice")
            seen.add(p.name)
        return v

    @field_validator("sample")
    @classmethod
    def _sample(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        if not v.strip() or "\0" in v:
            raise ValueError("expected a file name in the model folder, such as sample.csv")
        path = Path(v)
        if path.is_absolute() or v.startswith("~") or ".." in path.parts:
            raise ValueError(f"expected a file inside the model folder (a relative path without '..'); got {_short(v)}")
        return v

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, v: Any) -> Any:
        if not isinstance(v, str) or not SEMVER.match(v):
            raise ValueError(f"expected a semantic version such as 1.3.0 (quote it in YAML); got {_short(v)}")
        return v

    @field_validator("command")
    @classmethod
    def _command(cls, v: list[str]) -> list[str]:
        if any(not part for part in v):
            raise ValueError("expected non-empty strings, e.g. [Rscript, serve.R]")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        names = [f.name for f in self.features]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"features: duplicate column name(s) {', '.join(dupes)}")
        if self.kind == "batch" and self.visibility != "cluster":
            raise ValueError("visibility: only realtime models have an endpoint to make public (this model is "
                             "kind: batch)")
        if self.kind == "realtime" and self.batch is not None:
            raise ValueError("batch: only batch models take a 'batch' section (this model is kind: realtime)")
        if self.kind == "batch" and self.batch is None:
            object.__setattr__(self, "batch", Batch())
        return self

    # -- where the model lives -------------------------------------------------------
    @property
    def folder(self) -> Path:
        return self._folder

    @property
    def file(self) -> Path:
        return self._file

    @property
    def sample_path(self) -> Optional[Path]:
        return (self._folder / self.sample) if self.sample else None

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def passthrough_names(self) -> list[str]:
        return [p.name for p in self.passthrough]

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        """The manifest as plain data, defaults included (what the API shows); `passthrough` only
        when some are declared (so an adapter from before them still reads every other manifest)."""
        data = self.model_dump(mode="json", exclude_none=True)
        if not data.get("passthrough"):
            data.pop("passthrough", None)
        return data


class ManifestProblem(BaseModel):
    field: str
    line: Optional[int] = None
    message: str


class ManifestError(ValueError):
    """A manifest that cannot be used; `problems` lists every field that is wrong."""

    def __init__(self, file: Path | str, problems: list[ManifestProblem]):
        self.file = str(file)
        self.problems = problems
        super().__init__(self.describe())

    def describe(self) -> str:
        lines = []
        for p in self.problems:
            where = f"{self.file}:{p.line}" if p.line else self.file
            field = f"{p.field}: " if p.field else ""
            lines.append(f"{where}: {field}{p.message}")
        return "\n".join(lines)


def _field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _line_of(node: yaml.Node | None, loc: tuple) -> Optional[int]:
    """Line (1-based) of the YAML node at `loc`, or of its nearest existing parent."""
    if node is None:
        return None
    line = node.start_mark.line + 1
    for part in loc:
        nxt = None
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            for key, value in node.value:
                if key.value == part:
                    nxt = value
                    line = key.start_mark.line + 1
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            nxt = node.value[part]
            line = nxt.start_mark.line + 1
        if nxt is None:
            break
        node = nxt
    return line


def _message(err: dict) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown key (check the spelling; see the manifest reference in the README)"
    if kind == "missing":
        return "required field is missing"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"expected {expected}; got {_short(err.get('input'))}"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if kind in ("int_type", "int_parsing", "string_type", "bool_type", "bool_parsing", "list_type",
                "dict_type", "model_type", "float_type", "int_from_float"):
        return f"{msg[0].lower()}{msg[1:]}; got {_short(err.get('input'))}"
    return msg


#: A manifest is a few dozen lines; these bound what a hostile one can cost.
MAX_MANIFEST_BYTES = 256 * 2**10
#: Nodes a manifest may expand to through YAML aliases (a 446-byte "billion laughs" of nested
#: aliases would otherwise expand ninefold per level).
MAX_YAML_NODES = 10_000
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _ManifestLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (YAML says they are an error; PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = key_node.value
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {_short(key)} (first on line {seen[key]})", key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, limit: int) -> int:
    """How many nodes `node` stands for once every alias is expanded (stops counting past `limit`)."""
    memo: dict[int, int] = {}

    def size(n: yaml.Node, depth: int) -> int:
        if id(n) in memo:
            return memo[id(n)]
        if depth > 200:
            return limit + 1
        total = 1
        if isinstance(n, yaml.SequenceNode):
            for child in n.value:
                total += size(child, depth + 1)
                if total > limit:
                    break
        elif isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                total += size(k, depth + 1) + size(v, depth + 1)
                if total > limit:
                    break
        memo[id(n)] = total
        return total

    return size(node, 0)


def label_key_problem(key: str) -> Optional[str]:
    """What is wrong with `key` as a Kubernetes label key (None: nothing)."""
    prefix, _, name = key.rpartition("/")
    if "/" in key and not prefix:
        return f"expected a label key such as team or example.com/team; got {_short(key)}"
    if prefix and not (len(prefix) <= 253 and LABEL_PREFIX.match(prefix)):
        return f"expected the label key's prefix to be a DNS subdomain (such as example.com); got {_short(key)}"
    if not (len(name) <= 63 and LABEL_NAME.match(name)):
        return (f"expected a label key: an optional DNS-subdomain prefix and '/', then at most 63 of A-Z, a-z, 0-9, "
                f"'-', '_', '.', starting and ending alphanumeric; got {_short(key)}")
    return None


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} characters)"


class _MergeKey(yaml.YAMLError):
    """A YAML merge key (`<<`) in a manifest: where it is (line, field path)."""

    def __init__(self, line: int, field: str):
        super().__init__(f"merge key '<<' at line {line}")
        self.line, self.field = line, field


def _refuse_merge_keys(root: yaml.Node) -> None:
    """A manifest takes no YAML merge keys (`<<: *defaults`): a merge brings keys in silently,
    so one written beside a key it also brings would slip past the duplicate-key check, and
    the manifest would not say what it means. Plain aliases stay (a value reused as it is)."""
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, tuple]] = [(root, ())]
    while stack:
        node, path = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.tag == _MERGE_TAG:
                    raise _MergeKey(key.start_mark.line + 1, _field_path(path + ("<<",)))
                name = key.value if isinstance(key, yaml.ScalarNode) else "?"
                stack.append((value, path + (name,)))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((child, path + (i,)) for i, child in enumerate(node.value))


def _load_yaml(text: str) -> tuple[Optional[yaml.Node], Any]:
    loader = _ManifestLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        _refuse_merge_keys(node)
        expanded = _expanded_size(node, MAX_YAML_NODES)
        if expanded > MAX_YAML_NODES:
            raise yaml.YAMLError(f"the YAML expands to more than {MAX_YAML_NODES:,} nodes through aliases "
                                 "(a manifest needs a few dozen)")
        return node, loader.construct_document(node)
    finally:
        loader.dispose()


def read_manifest_text(path: Path | str) -> str:
    """A manifest file's text: at most MAX_MANIFEST_BYTES of UTF-8, else a ManifestError naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise ManifestError(path, [ManifestProblem(field="", message="no model.yaml here: a model folder needs one")]) from None
    except IsADirectoryError:
        raise ManifestError(path, [ManifestProblem(field="", message="is a folder, not a file")]) from None
    except OSError as e:
        raise ManifestError(path, [ManifestProblem(field="", message=f"cannot read: {e.strerror}")]) from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(path, [ManifestProblem(
            field="", message=f"larger than {MAX_MANIFEST_BYTES // 1024} KiB: a manifest is a few dozen lines")])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ManifestError(path, [ManifestProblem(
            field="", line=line, message=f"not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); save it as UTF-8")]) from None


_ITEM = re.compile(r"^\[(\d+)\] ")


def parse_manifest(text: str, *, file: Path | str = MANIFEST_FILE, folder: Path | None = None,
                   check_files: bool = True) -> Manifest:
    """Parse and validate manifest text; raise ManifestError naming file, line and field."""
    file = Path(file)
    if len(text) > MAX_MANIFEST_BYTES:
        raise ManifestError(file, [ManifestProblem(
            field="", message=f"larger than {MAX_MANIFEST_BYTES // 1024} KiB: a manifest is a few dozen lines")])
    try:
        node, data = _load_yaml(text)
    except _MergeKey as e:
        raise ManifestError(file, [ManifestProblem(
            field=e.field, line=e.line, message="YAML merge keys ('<<') are not accepted in a manifest: write the "
                                                "keys out (an alias to a whole value is fine)")]) from None
    except (yaml.YAMLError, RecursionError) as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else None
        problem = getattr(e, "problem", None) or (str(e) if isinstance(e, yaml.YAMLError) else "nested too deeply")
        raise ManifestError(file, [ManifestProblem(field="", line=line, message=f"not valid YAML: {problem}")]) from None
    if not isinstance(data, dict):
        raise ManifestError(file, [ManifestProblem(field="", line=1, message="expected a mapping of keys such as name, version, kind")])
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            message = _message(err)
            item = _ITEM.match(message) if loc == ("passthrough",) else None
            if item:  # a list check naming the item at fault: its own field path and line
                loc, message = loc + (int(item.group(1)),), message[item.end():]
            problems.append(ManifestProblem(field=_field_path(loc), line=_line_of(node, loc), message=message))
        raise ManifestError(file, problems) from None
    manifest._folder = (folder if folder is not None else file.parent).resolve()
    manifest._file = file
    if check_files and manifest.sample:
        sample = manifest.sample_path
        where = dict(field="sample", line=_line_of(node, ("sample",)))
        try:
            inside = sample.resolve().is_relative_to(manifest._folder)
        except (OSError, RuntimeError):  # a symlink loop
            inside = False
        if not inside:
            raise ManifestError(file, [ManifestProblem(**where, message=f"{manifest.sample!r} leads outside the model folder")])
        if not sample.is_file():
            raise ManifestError(file, [ManifestProblem(**where, message=f"file not found: {manifest.sample}")])
    return manifest


def load_manifest(path: Path | str, *, check_files: bool = True) -> Manifest:
    """Load `model.yaml` from a model folder or a manifest path."""
    path = Path(path)
    file = path / MANIFEST_FILE if path.is_dir() else path
    text = read_manifest_text(file)
    return parse_manifest(text, file=file, folder=file.parent, check_files=check_files)
