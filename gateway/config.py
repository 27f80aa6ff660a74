"""Configuration: pydantic models (unknown keys are errors) and a YAML loader that
reports every problem as ``FILE:LINE: path.to.key: message``.

Paths in the file are relative to the file itself; :func:`read_config` resolves them.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.errors import ConfigError

DEFAULT_CONFIG = Path("config/gateway.yaml")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Port = Annotated[int, Field(ge=1, le=65535)]
ListenPort = Annotated[int, Field(ge=0, le=65535)]  # 0 = any free port (tests)
Seconds = Annotated[float, Field(gt=0)]
AETitle = Annotated[str, Field(min_length=1, max_length=16, pattern=r"^[\x20-\x5b\x5d-\x7e]*$")]


def _check_host(value: str) -> str:
    if value in ("localhost", "*"):
        return value
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9.-]+", value):
            raise ValueError(f"'{value}' is not an IP address, network or host name") from None
    return value


class HTTPConfig(_Strict):
    host: str = "127.0.0.1"
    port: ListenPort = 8080


class InferenceConfig(_Strict):
    """The model runner: worker processes that load the models and run them."""

    processes: int = Field(default=1, ge=1, le=64)
    torch_threads: int = Field(default=0, ge=0)  # 0: the cores shared among the processes
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when torch sees a GPU
    warm_up: bool = True  # one run on a blank input per model at start


class IngestSection(_Strict):
    """The listener processes: each runs the DICOM SCP and the MLLP listener on the same
    ports (SO_REUSEPORT; the kernel spreads the connections among them)."""

    processes: int = Field(default=1, ge=1, le=64)


class FindingsSection(_Strict):
    """The findings store (every model finding as a row, gateway/store/findings.py)."""

    # days a model run's rows are kept; apart from gateway.retention_days, since the
    # statistics (prevalence, drift, concordance) outlive the images. null: kept for ever
    retention_days: float | None = Field(default=365.0, gt=0)


class DashboardTLS(_Strict):
    """HTTPS on gateway.http for the dashboard: our certificate, and the CA that client
    certificates (an alternative to bearer tokens) chain to."""

    cert: Path
    key: Path
    ca: Path | None = None


class DashboardSection(_Strict):
    """The read-only web UI (gateway/dashboard/) on gateway.http, over HTTPS, for the
    holders of a token in *tokens_file* (or of a client certificate it names)."""

    tokens_file: Path
    tls: DashboardTLS


class WorkersSection(_Strict):
    """The worker processes: each routes, runs models, builds results and delivers."""

    processes: int = Field(default=1, ge=1, le=64)
    # how long a job stays with a worker that stops renewing its lease (renewed every tenth
    # of it while the job runs): when a node dies, another takes its jobs over after this
    lease_seconds: float = Field(default=60.0, ge=2, le=3600)


class ServerTLS(_Strict):
    """TLS on a listening port: our certificate, and the CA client certificates chain to."""

    port: ListenPort
    cert: Path
    key: Path
    ca: Path | None = None
    require_client_cert: bool = True

    @model_validator(mode="after")
    def _ca_for_clients(self) -> ServerTLS:
        if self.require_client_cert and self.ca is None:
            raise ValueError("require_client_cert is true, so 'ca' must name the CA file")
        return self


class ClientTLS(_Strict):
    """TLS towards a destination: verify the peer against ``ca``, present ``cert``/``key``."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    @model_validator(mode="after")
    def _pair(self) -> ClientTLS:
        if (self.cert is None) != (self.key is None):
            raise ValueError("'cert' and 'key' go together")
        return self


# short names of the subject attributes a client certificate is matched on (cert_subject)
SUBJECT_NAMES = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "emailAddress": "EMAIL",
    "serialNumber": "SERIALNUMBER",
}


def parse_subject(text: str) -> frozenset[tuple[str, str]]:
    """``"pacs1"`` (a common name) or ``"CN=pacs1,O=Hospital"`` as a set of (attribute,
    value) pairs; ValueError when it cannot be read."""
    text = text.strip()
    if not text:
        raise ValueError("cert_subject is empty")
    if "=" not in text:
        return frozenset({("CN", text)})
    pairs = set()
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip().upper()
        if not sep or not value.strip():
            raise ValueError(f"cert_subject part {part.strip()!r} is not NAME=value")
        if name not in set(SUBJECT_NAMES.values()):
            known = ", ".join(sorted(set(SUBJECT_NAMES.values())))
            raise ValueError(f"cert_subject attribute {name!r} is not one of {known}")
        pairs.add((name, value.strip()))
    return frozenset(pairs)


def _check_subject(value: str | None) -> str | None:
    if value is not None:
        parse_subject(value)  # raises ValueError with the reason
    return value


class AuditSyslog(_Strict):
    """A copy of every audit record to a syslog server: RFC 5424 over TLS (RFC 5425)."""

    host: str
    port: Annotated[int, Field(ge=1, le=65535)] = 6514
    tls: ClientTLS  # verify the server against tls.ca; present tls.cert when it asks


class AuditConfig(_Strict):
    syslog: AuditSyslog | None = None
    # seconds in which a refusal repeated exactly (same peer, same reason) is counted
    # instead of written again; 0 writes every one
    repeat_window: Annotated[float, Field(ge=0, le=3600)] = 60.0


def _check_database(value: str | None) -> str | None:
    """``null`` (the embedded SQLite file) or a PostgreSQL URL without a password."""
    if value is None:
        return None
    url = urlsplit(value)
    if url.scheme not in ("postgresql", "postgres"):
        raise ValueError(
            f"'{value[:60]}' is not a PostgreSQL URL: write postgresql://USER@HOST:5432/DB, "
            "or null for the embedded SQLite file in data_dir"
        )
    if url.password is not None:
        raise ValueError(
            "the URL holds a password: put it in database_password_file (or the PGPASSWORD "
            "environment variable), never in the config file"
        )
    try:
        url.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError:
        raise ValueError("the URL's port is not a number") from None
    if not url.hostname and "host=" not in url.query:
        raise ValueError("the URL names no host: postgresql://USER@HOST:5432/DB")
    return value


class GatewaySection(_Strict):
    data_dir: Path = Path("../var")
    # the queue and state: null = the embedded SQLite file in data_dir (one node); or a
    # PostgreSQL URL (several processes and nodes), password from database_password_file
    # or the PGPASSWORD environment variable
    database: str | None = None
    database_password_file: Path | None = None
    # the encrypted spool: null = data_dir/spool; nodes sharing a PostgreSQL database
    # point it at the same shared storage
    spool_dir: Path | None = None
    http: HTTPConfig = HTTPConfig()
    encryption_key_file: Path = Path("../var/keys.json")
    inference: InferenceConfig = InferenceConfig()
    audit: AuditConfig = AuditConfig()
    # days a study or message is kept after the gateway is done with it (every job done);
    # then it, its results and, eventually, the keys that sealed them are deleted.
    # null: keep everything (the spool grows until someone runs `gateway purge`)
    retention_days: float | None = Field(default=None, gt=0)
    # MB of free space kept on the data dir's and the spool's volumes: below it, new DICOM
    # instances get 0xA700 and HL7 messages AE (try later) while the work already accepted
    # goes on; 0: no check (a full disk then fails writes as they come)
    min_free_mb: Annotated[int, Field(ge=0)] = 1024

    _database = field_validator("database")(lambda v: _check_database(v))

    @model_validator(mode="after")
    def _password_needs_a_database(self) -> GatewaySection:
        if self.database_password_file is not None and self.database is None:
            raise ValueError("database_password_file is set, but database is null (SQLite)")
        return self


class AllowedCaller(_Strict):
    ae_title: AETitle
    hosts: list[str] = Field(min_length=1)
    # with TLS: the client certificate's subject this caller must present, as its common
    # name ("pacs1") or as attributes, e.g. "CN=pacs1,O=General Hospital" (all must match)
    cert_subject: str | None = None

    _hosts = field_validator("hosts")(lambda v: [_check_host(h) for h in v])

    _subject = field_validator("cert_subject")(lambda v: _check_subject(v))


class DicomSection(_Strict):
    ae_title: AETitle = "AI_GATEWAY"
    host: str = "127.0.0.1"
    port: ListenPort | None = 11112  # null: no plain port (TLS only)
    max_associations: Annotated[int, Field(ge=1, le=1000)] = 16
    max_pdu: Annotated[int, Field(ge=0)] = 0
    tls: ServerTLS | None = None
    allowed_callers: list[AllowedCaller] = Field(min_length=1)
    study_complete_after: Seconds = 5
    # Write each instance to data_dir/incoming as it arrives instead of holding it in
    # memory: for sites sending instances of hundreds of MB (whole-slide, long multi-frame).
    # Trade-off: a full disk then aborts the association instead of answering 0xA700.
    receive_to_disk: bool = False

    @model_validator(mode="after")
    def _listens(self) -> DicomSection:
        if self.port is None and self.tls is None:
            raise ValueError("@port: null switches the plain port off, which needs dicom.tls")
        return self


class AllowedSender(_Strict):
    application: str = Field(min_length=1)
    facility: str | None = None
    hosts: list[str] = Field(min_length=1)
    cert_subject: str | None = None  # as for AllowedCaller: the TLS client certificate

    _hosts = field_validator("hosts")(lambda v: [_check_host(h) for h in v])
    _subject = field_validator("cert_subject")(lambda v: _check_subject(v))


class HL7Section(_Strict):
    host: str = "127.0.0.1"
    port: ListenPort | None = 2575  # null: no plain port (TLS only)
    tls: ServerTLS | None = None
    allowed_senders: list[AllowedSender] = Field(min_length=1)
    max_frame_bytes: Annotated[int, Field(ge=1024)] = 16 * 1024 * 1024
    idle_timeout: Seconds = 600

    @model_validator(mode="after")
    def _listens(self) -> HL7Section:
        if self.port is None and self.tls is None:
            raise ValueError("@port: null switches the plain port off, which needs hl7.tls")
        return self


class RetryPolicyConfig(_Strict):
    initial: Seconds = 5
    max: Seconds = 600
    give_up_after: Seconds = 86400


class DicomDestination(_Strict):
    ae_title: AETitle
    host: str
    port: Port
    tls: ClientTLS | None = None


class HL7Destination(_Strict):
    host: str
    port: Port
    tls: ClientTLS | None = None
    application: str = "EHR"
    facility: str = "HOSP"
    ack_timeout: Seconds = 30  # no ACK within this = retried


class Destination(_Strict):
    dicom: DicomDestination | None = None
    hl7: HL7Destination | None = None
    retry: RetryPolicyConfig = RetryPolicyConfig()
    # one delivery at a time to this destination across every process and node (a peer
    # that takes one association, or needs its messages one after the other)
    one_at_a_time: bool = False

    @model_validator(mode="after")
    def _one_kind(self) -> Destination:
        if (self.dicom is None) == (self.hl7 is None):
            raise ValueError("a destination has exactly one of 'dicom' or 'hl7'")
        return self


class ModelConfig(_Strict):
    """One model: a MONAI bundle folder, and the limits of one run of it."""

    bundle: Path
    timeout: float = Field(default=300.0, gt=0)  # seconds; past it the run is stopped
    memory_mb: int = Field(default=4096, ge=256)  # resident memory of the model process
    # the model sees de-identified input (PS3.15 basic profile; scrubbed report text), and
    # its results are re-identified before they are built and sent
    deidentify: bool = False


MatchValue = str | int | float | bool | list[str | int | float] | dict[str, Any]


class When(_Strict):
    dicom: dict[str, MatchValue] | None = None
    hl7: dict[str, MatchValue] | None = None

    @field_validator("dicom", "hl7")
    @classmethod
    def _operators(cls, value: dict[str, MatchValue] | None) -> dict[str, MatchValue] | None:
        for key, cond in (value or {}).items():
            if isinstance(cond, dict):
                if set(cond) == {"regex"}:
                    try:
                        re.compile(str(cond["regex"]))
                    except re.error as exc:
                        raise ValueError(f"@{key}: bad regex {cond['regex']!r}: {exc}") from None
                elif set(cond) == {"present"}:
                    if not isinstance(cond["present"], bool):
                        raise ValueError(f"@{key}: 'present' takes true or false")
                else:
                    raise ValueError(
                        f"@{key}: a condition is a value, a list, {{regex: ...}} or "
                        f"{{present: true|false}}, not {json.dumps(cond)}"
                    )
        return value

    @model_validator(mode="after")
    def _something(self) -> When:
        if self.dicom is None and self.hl7 is None:
            raise ValueError("'when' needs 'dicom' or 'hl7' conditions")
        return self


class Route(_Strict):
    name: str = Field(min_length=1)
    when: When
    run: list[str] = []
    send: list[str] = []
    forward: list[str] = []


class Config(_Strict):
    gateway: GatewaySection = GatewaySection()
    dicom: DicomSection
    hl7: HL7Section
    ingest: IngestSection = IngestSection()
    workers: WorkersSection = WorkersSection()
    findings: FindingsSection = FindingsSection()
    dashboard: DashboardSection | None = None
    destinations: dict[str, Destination] = {}
    models: dict[str, ModelConfig] = {}
    routes: list[Route] = []
    source: Literal[None] | Path = Field(default=None, exclude=True)
    # where each key sits in the file it was read from, for messages about it (where())
    _filename: str = PrivateAttr(default="")
    _lines: dict[tuple[str, ...], int] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _references(self) -> Config:
        problems = reference_problems(
            [r.model_dump() for r in self.routes], self.models, self.destinations
        )
        for i, route in enumerate(self.routes):
            kinds = {k for k in ("dicom", "hl7") if getattr(route.when, k) is not None}
            for j, name in enumerate(route.forward):
                dest = self.destinations.get(name)
                if dest is None:
                    continue
                dest_kind = "dicom" if dest.dicom is not None else "hl7"
                if dest_kind not in kinds:
                    problems.append(
                        f"@routes.{i}.forward.{j}: '{name}' is a{'n' if dest_kind == 'hl7' else ''}"
                        f" {dest_kind.upper()} destination but this route matches only "
                        f"{' and '.join(sorted(kinds)).upper()} objects; forward passes objects "
                        "on unchanged, so it needs a destination of the same kind"
                    )
        if problems:
            # '@path: message' lines: the loader turns each into its own FILE:LINE error.
            raise ValueError("\n".join(problems))
        return self

    @property
    def base_dir(self) -> Path:
        return self.source.parent if self.source else Path.cwd()

    def path(self, value: Path) -> Path:
        """Resolve a path written in the config file relative to that file."""
        return value if value.is_absolute() else (self.base_dir / value).resolve()

    def where(self, *loc: str) -> str:
        """``FILE:LINE: a.b.c`` for the key at *loc*, the way every config message starts."""
        return f"{self._filename or self.source}:{_line_for(loc, self._lines)}: {'.'.join(loc)}"

    @property
    def data_dir(self) -> Path:
        return self.path(self.gateway.data_dir)

    @property
    def key_file(self) -> Path:
        return self.path(self.gateway.encryption_key_file)

    @property
    def spool_dir(self) -> Path:
        spool = self.gateway.spool_dir
        return self.path(spool) if spool is not None else self.data_dir / "spool"


def reference_problems(routes: Any, models: Any, destinations: Any) -> list[str]:
    """Routes naming models or destinations that do not exist, and duplicate route names,
    as '@path: message' lines.  Works on plain data too, so these are reported even when
    other parts of the file are invalid."""
    problems: list[str] = []
    if not isinstance(routes, list):
        return problems
    models = list(models) if isinstance(models, dict | list) else []
    destinations = list(destinations) if isinstance(destinations, dict | list) else []
    seen: set[str] = set()
    for i, route in enumerate(routes):
        if not isinstance(route, dict):
            continue
        name = route.get("name")
        if isinstance(name, str):
            if name in seen:
                problems.append(f"@routes.{i}.name: duplicate route name '{name}'")
            seen.add(name)
        for field, known, what in (
            ("run", models, "model"),
            ("send", destinations, "destination"),
            ("forward", destinations, "destination"),
        ):
            names = route.get(field) or []
            for j, ref in enumerate(names if isinstance(names, list) else []):
                if isinstance(ref, str) and ref not in known:
                    problems.append(
                        f"@routes.{i}.{field}.{j}: unknown {what} '{ref}'"
                        f"{_did_you_mean(ref, known)}"
                    )
    return problems


def _did_you_mean(name: str, choices: Any) -> str:
    # the names as written: in a file that fails validation a key may be a number
    close = difflib.get_close_matches(name, [str(c) for c in choices], n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


# --- YAML with line numbers -------------------------------------------------------------

LineMap = dict[tuple[str, ...], int]

MAX_VALUES = 10_000  # a real config holds hundreds; more means aliases expanding
MAX_DEPTH = 64  # mappings and lists inside each other, the file's own mapping the first
_MERGE = "tag:yaml.org,2002:merge"


class _Builder:
    """The plain values of composed YAML nodes, and the line of each key path: what
    ``yaml.safe_load`` builds, with PyYAML's safe constructor, node by node.  Whatever
    cannot be built (an unknown tag, a date that is none, a key that is a list, an alias
    inside itself, aliases expanding past :data:`MAX_VALUES`) is a ``ConfigError`` line
    ``line N: path: message``."""

    def __init__(self) -> None:
        self.lines: LineMap = {}
        self.constructor = yaml.constructor.SafeConstructor()
        self.values = 0
        self.building: set[int] = set()  # the collections being built (an alias to one loops)

    def value(self, node: yaml.Node, path: tuple[str, ...]) -> Any:
        self.values += 1
        if self.values > MAX_VALUES:
            raise _node_error(node, path, f"more than {MAX_VALUES} values (aliases expanding?)")
        self.lines[path] = node.start_mark.line + 1
        if not isinstance(node, yaml.CollectionNode):
            return self.scalar(node, path)
        if id(node) in self.building:
            raise _node_error(node, path, "an alias refers to a collection that holds it")
        self.building.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self.mapping(node, path)
            return [self.value(item, (*path, str(i))) for i, item in enumerate(node.value)]
        finally:
            self.building.discard(id(node))

    def mapping(self, node: yaml.MappingNode, path: tuple[str, ...]) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                raise _node_error(
                    key_node, path, "YAML merge keys (<<) are not supported: write the keys out"
                )
            if isinstance(key_node, yaml.CollectionNode):
                raise _node_error(
                    key_node, path, "a key must be a single value, not a list or mapping"
                )
            key = self.scalar(key_node, path)
            if key in out:
                raise _node_error(key_node, (*path, str(key)), "duplicate key")
            self.lines[(*path, str(key))] = key_node.start_mark.line + 1
            out[key] = self.value(value_node, (*path, str(key)))
            self.lines[(*path, str(key))] = key_node.start_mark.line + 1
        return out

    def scalar(self, node: yaml.Node, path: tuple[str, ...]) -> Any:
        try:
            return self.constructor.construct_object(node, deep=True)
        except yaml.MarkedYAMLError as exc:  # e.g. an unknown tag (!!python/object)
            raise _node_error(node, path, str(exc.problem or exc)) from None
        except Exception as exc:
            # PyYAML's constructors fail in many ways on a value they cannot read: ValueError
            # (2026-13-45, 0b_), IndexError (an empty !!int), KeyError (an empty !!bool),
            # AttributeError (!!timestamp x)
            reason = f"{exc}" if isinstance(exc, ValueError) else type(exc).__name__
            raise _node_error(node, path, f"{node.value!r} cannot be read: {reason}") from None


def _node_error(node: yaml.Node, path: tuple[str, ...], message: str) -> ConfigError:
    return ConfigError([f"line {node.start_mark.line + 1}: {'.'.join(path) or '(top)'}: {message}"])


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing nesting past :data:`MAX_DEPTH` as it composes (its
    composer recurses once per level: a few kilobytes of brackets would otherwise run into
    the recursion limit, slowly)."""

    depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise ConfigError(
                    [f"line {mark.line + 1}: lists or mappings nested more than {MAX_DEPTH} deep"]
                )
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def parse_yaml(text: str, filename: str) -> tuple[Any, LineMap]:
    """Parse YAML text into plain values plus a map from key path to line number."""
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark else 0
        raise ConfigError([f"{filename}:{line}: {exc.problem or exc}"]) from None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow
        line = text.count("\n", 0, exc.position) + 1
        reason = f"character #x{exc.character:04x} is not allowed in YAML ({exc.reason})"
        raise ConfigError([f"{filename}:{line}: {reason}"]) from None
    except ConfigError as exc:
        raise ConfigError([f"{filename}:{e.removeprefix('line ')}" for e in exc.errors]) from None
    if node is None:
        return {}, {}
    builder = _Builder()
    try:
        return builder.value(node, ()), builder.lines
    except ConfigError as exc:
        raise ConfigError([f"{filename}:{e.removeprefix('line ')}" for e in exc.errors]) from None
    except RecursionError:  # aliases nesting collections inside each other
        raise ConfigError([f"{filename}:0: lists or mappings are nested too deeply"]) from None


def _line_for(loc: tuple[str, ...], lines: LineMap) -> int:
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return 1


def _format_errors(exc: ValidationError, filename: str, lines: LineMap) -> list[str]:
    out: list[str] = []
    for err in exc.errors(include_url=False):
        # pydantic inserts union member names (e.g. 'str', 'list[...]') into loc; drop them.
        loc = tuple(str(p) for p in err["loc"] if not _is_type_tag(str(p)))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            parent = loc[:-1]
            known = _known_keys(parent)
            msg = f"unknown key{_did_you_mean(loc[-1], known)}"
        if msg.startswith("@"):
            # Validators report problems below their own level as '@sub.path: message' lines.
            for sub in msg.split("\n"):
                sub_path, _, sub_msg = sub.removeprefix("@").partition(": ")
                sub_loc = (*loc, *sub_path.split("."))
                out.append(
                    f"{filename}:{_line_for(sub_loc, lines)}: {'.'.join(sub_loc)}: {sub_msg}"
                )
            continue
        where = ".".join(loc) or "(top)"
        out.append(f"{filename}:{_line_for(loc, lines)}: {where}: {msg}")
    return out


def _at_lines(
    problems: list[str], filename: str, lines: LineMap, loc: tuple[str, ...] = ()
) -> list[str]:
    out = []
    for sub in problems:
        sub_path, _, sub_msg = sub.removeprefix("@").partition(": ")
        sub_loc = (*loc, *sub_path.split("."))
        out.append(f"{filename}:{_line_for(sub_loc, lines)}: {'.'.join(sub_loc)}: {sub_msg}")
    return out


def _is_type_tag(part: str) -> bool:
    return (
        part in {"str", "int", "float", "bool"}
        or part.startswith(("list[", "dict["))
        or part
        in {
            "function-after[_check_host(), str]",
        }
    )


def _known_keys(parent: tuple[str, ...]) -> list[str]:
    model: Any = Config
    skip_name = False  # under dict[str, Model] the next part is the user's own name
    for part in parent:
        if part.isdigit() or skip_name:
            skip_name = False
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        ann = field.annotation
        skip_name = getattr(ann, "__origin__", None) is dict
        model = _model_in(ann)
        if model is None:
            return []
    return list(model.model_fields) if hasattr(model, "model_fields") else []


def _model_in(ann: Any) -> Any:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def read_config(path: Path | str) -> Config:
    """Read and validate the config (schema and references between its sections); raise
    :class:`ConfigError` listing every problem.  Files the config names are not opened here:
    :func:`gateway.preflight.load_config` checks them too."""
    path = Path(path)
    filename = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{filename}:0: cannot read the config file: {exc.strerror}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            [f"{filename}:{line}: the file is not UTF-8 text (byte 0x{raw[exc.start]:02X})"]
        ) from None
    data, lines = parse_yaml(text, filename)
    if not isinstance(data, dict):
        raise ConfigError([f"{filename}:1: (top): the config file must be a mapping of sections"])
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        errors = _format_errors(exc, filename, lines)
        refs = reference_problems(data.get("routes"), data.get("models"), data.get("destinations"))
        errors += [e for e in _at_lines(refs, filename, lines) if e not in errors]
        raise ConfigError(errors) from None
    cfg = cfg.model_copy(update={"source": path.resolve()})
    cfg._filename, cfg._lines = filename, lines
    return cfg


def json_schema() -> dict[str, Any]:
    """JSON Schema of the config file, for editors (``gateway config-schema``)."""
    schema = Config.model_json_schema(mode="validation")
    schema["properties"].pop("source", None)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "AI gateway configuration"
    return schema
