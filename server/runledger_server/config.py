"""Server settings: the only module that reads the environment; everything else receives a Settings."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50051
DEFAULT_DATA_DIR = "./runledger-data"
DEFAULT_METRIC_CACHE_MIB = 128
DEFAULT_INGEST_BUFFER_MIB = 256
DEFAULT_HISTORY_MAX_POINTS = 10_000_000
DEFAULT_SEARCH_BUDGET_SECONDS = 10
# What the minio SDK accepts as a region name; anything else would fail later, inside the artifact backend.
_REGION = re.compile(r"[a-z0-9](?:[a-z0-9_-]{0,61}[a-z0-9])?", re.IGNORECASE)


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the flag and the environment variable."""


@dataclass(frozen=True)
class S3Settings:
    """Where the S3/MinIO artifact backend lives and how to sign requests."""

    endpoint: str = ""
    access_key: str = ""
    secret_key: str = ""
    secure: bool = False
    # Empty: the SDK asks the bucket for its region, so a bucket outside us-east-1 still gets correct signatures.
    region: str = ""
    session_token: str = ""  # for temporary credentials (STS, SSO, instance roles)


@dataclass(frozen=True)
class Settings:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    db_url: str = ""  # empty: SQLite under data_dir
    artifacts: str = ""  # empty: a local directory under data_dir; or s3://bucket/prefix
    s3: S3Settings = field(default_factory=S3Settings)
    grace_seconds: float = 10.0
    # Decoded metric chunks kept in memory per server (0: none); each replica has its own.
    metric_cache_mib: int = DEFAULT_METRIC_CACHE_MIB
    # Metric points received and not yet committed, across all streams; readers wait beyond it.
    ingest_buffer_mib: int = DEFAULT_INGEST_BUFFER_MIB
    # Points one GetMetricHistory call may read (~24 bytes each in memory); longer ranges are refused.
    history_max_points: int = DEFAULT_HISTORY_MAX_POINTS
    # Database work one search (SearchRuns, ListExperiments, each page of SelectWinner) may take before it is
    # stopped as RESOURCE_EXHAUSTED QUERY_TOO_EXPENSIVE.
    search_budget_seconds: int = DEFAULT_SEARCH_BUDGET_SECONDS

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{(self.data_dir / 'runledger.db').as_posix()}"

    @property
    def artifact_location(self) -> str:
        return self.artifacts or str(self.data_dir / "artifacts")


def _bool_setting(value: str | None, default: bool, flag: str, env_name: str) -> bool:
    """true/false (also 1/0, yes/no, on/off); anything else is refused rather than read as false."""
    if value is None or value == "":
        return default
    text = value.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{flag} (env {env_name}) must be true or false, got {value!r}")


def _region_setting(env: Mapping[str, str]) -> str:
    """AWS_REGION, else AWS_DEFAULT_REGION (what AWS tools fall back to), else empty: the bucket is asked."""
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        value = env.get(name, "")
        if value:
            if not _REGION.fullmatch(value):
                raise ConfigError(f"env {name} must be an S3 region name such as eu-west-1, got {value!r}")
            return value
    return ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help=f"listen address (env RUNLEDGER_HOST, default {DEFAULT_HOST})")
    # Checked in from_args, not by argparse, so that a bad value is refused naming the flag and the variable.
    parser.add_argument("--port", help=f"port, 0 picks a free one (env RUNLEDGER_PORT, default {DEFAULT_PORT})")
    parser.add_argument("--data-dir", help=f"data directory (env RUNLEDGER_DATA_DIR, default {DEFAULT_DATA_DIR})")
    parser.add_argument("--db", help="SQLAlchemy URL, e.g. postgresql+psycopg://... (env RUNLEDGER_DB)")
    parser.add_argument("--artifacts", help="directory or s3://bucket/prefix (env RUNLEDGER_ARTIFACTS)")
    parser.add_argument("--s3-endpoint", help="host:port of the S3/MinIO server (env RUNLEDGER_S3_ENDPOINT)")
    parser.add_argument("--s3-secure", help="true or false: use TLS for S3 (env RUNLEDGER_S3_SECURE)")
    parser.add_argument(
        "--metric-cache-mib",
        help="memory for recently written or read metric history, 0 for none "
        f"(env RUNLEDGER_METRIC_CACHE_MIB, default {DEFAULT_METRIC_CACHE_MIB})",
    )
    parser.add_argument(
        "--ingest-buffer-mib",
        help="memory for metric points received and not yet committed, across all streams; senders are slowed "
        f"beyond it (env RUNLEDGER_INGEST_BUFFER_MIB, default {DEFAULT_INGEST_BUFFER_MIB})",
    )
    parser.add_argument(
        "--history-max-points",
        help="points one metric history read may hold in memory (about 24 bytes each); a longer range is "
        "refused, and read in parts by the Python client "
        f"(env RUNLEDGER_HISTORY_MAX_POINTS, default {DEFAULT_HISTORY_MAX_POINTS})",
    )
    parser.add_argument(
        "--search-budget-seconds",
        help="database work one search may take before it is stopped and refused "
        f"(env RUNLEDGER_SEARCH_BUDGET_SECONDS, default {DEFAULT_SEARCH_BUDGET_SECONDS})",
    )


def _int_setting(text: str, flag: str, env_name: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise ConfigError(f"{flag} (env {env_name}) must be an integer from {low} to {high}, got {text!r}")
    return value


def from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    """Flags win over RUNLEDGER_* environment variables, which win over defaults."""
    env = os.environ if env is None else env

    def pick(flag: object, name: str, default: str) -> str:
        if flag is not None:
            return str(flag)
        return env.get(name) or default  # an empty variable counts as unset (RUNLEDGER_HOST= is no address)

    def integer(setting: str, default: int, low: int, high: int) -> int:
        """The setting's flag is --<setting with dashes>, its variable RUNLEDGER_<SETTING>."""
        flag, variable = "--" + setting.replace("_", "-"), "RUNLEDGER_" + setting.upper()
        return _int_setting(pick(getattr(args, setting, None), variable, str(default)), flag, variable, low, high)

    secure_flag = getattr(args, "s3_secure", None)
    if secure_flag is not None and not secure_flag.strip():  # not unset (that is the variable's empty value)
        raise ConfigError("--s3-secure (env RUNLEDGER_S3_SECURE) must be true or false, got ''")
    settings = Settings(
        host=pick(getattr(args, "host", None), "RUNLEDGER_HOST", DEFAULT_HOST),
        port=integer("port", DEFAULT_PORT, 0, 65535),
        data_dir=Path(pick(getattr(args, "data_dir", None), "RUNLEDGER_DATA_DIR", DEFAULT_DATA_DIR)),
        db_url=pick(getattr(args, "db", None), "RUNLEDGER_DB", ""),
        artifacts=pick(getattr(args, "artifacts", None), "RUNLEDGER_ARTIFACTS", ""),
        s3=S3Settings(
            endpoint=pick(getattr(args, "s3_endpoint", None), "RUNLEDGER_S3_ENDPOINT", ""),
            access_key=env.get("AWS_ACCESS_KEY_ID") or env.get("MINIO_ROOT_USER", ""),
            secret_key=env.get("AWS_SECRET_ACCESS_KEY") or env.get("MINIO_ROOT_PASSWORD", ""),
            secure=_bool_setting(
                secure_flag if secure_flag is not None else env.get("RUNLEDGER_S3_SECURE"),
                False,
                "--s3-secure",
                "RUNLEDGER_S3_SECURE",
            ),
            region=_region_setting(env),
            session_token=env.get("AWS_SESSION_TOKEN", ""),
        ),
        metric_cache_mib=integer("metric_cache_mib", DEFAULT_METRIC_CACHE_MIB, 0, 1 << 20),
        ingest_buffer_mib=integer("ingest_buffer_mib", DEFAULT_INGEST_BUFFER_MIB, 1, 1 << 20),
        # A stored chunk holds up to a batch, 1,000,000 points: any one must fit a read.
        history_max_points=integer("history_max_points", DEFAULT_HISTORY_MAX_POINTS, 1_000_000, 1 << 40),
        search_budget_seconds=integer("search_budget_seconds", DEFAULT_SEARCH_BUDGET_SECONDS, 1, 3600),
    )
    _s3_endpoint(settings.s3.endpoint)
    s3_named = bool(settings.s3.endpoint) or settings.s3.secure
    return replace(
        settings,
        db_url=_database_url(settings.db_url),
        artifacts=_artifact_location(settings.artifacts, s3_named, settings.s3.endpoint),
    )


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def _artifact_location(location: str, s3_named: bool, endpoint: str = "") -> str:
    """A directory or `s3://bucket/prefix`; a location that looks like another store is refused, not made a
    directory of that name, and so are S3 settings without an S3 location (each replica would keep its own
    artifacts on its own disk)."""
    scheme = _SCHEME.match(location)
    if scheme and scheme.group(1) != "s3":
        hint = " (write s3:// in lower case)" if scheme.group(1).lower() == "s3" else ""
        raise ConfigError(
            f"--artifacts (env RUNLEDGER_ARTIFACTS) must be a directory or s3://bucket/prefix, got {location!r}{hint}"
        )
    bucket = location[len("s3://") :].split("/", 1)[0] if scheme else ""
    if scheme and not bucket:
        raise ConfigError(f"--artifacts (env RUNLEDGER_ARTIFACTS) {location!r} names no bucket: s3://bucket/prefix")
    if scheme:
        from minio.helpers import check_bucket_name  # the SDK's own rule, which the store applies at startup

        host = endpoint.rsplit(":", 1)[0] if endpoint else "s3.amazonaws.com"
        try:
            check_bucket_name(bucket, strict=True, s3_check=host.endswith("amazonaws.com"))  # as make_bucket
        except ValueError as exc:
            raise ConfigError(
                f"--artifacts (env RUNLEDGER_ARTIFACTS) {location!r}: {bucket!r} is not a valid S3 bucket name ({exc})"
            ) from None
    if s3_named and not scheme:
        raise ConfigError(
            "--s3-endpoint / --s3-secure (env RUNLEDGER_S3_ENDPOINT / RUNLEDGER_S3_SECURE) are set, but the "
            "artifacts go to a directory: give --artifacts s3://bucket/prefix (env RUNLEDGER_ARTIFACTS)"
        )
    return location


def _database_url(url: str) -> str:
    """SQLite or PostgreSQL through psycopg 3 (the driver installed); `postgres://` and `postgresql://` as PostgreSQL
    tools write them are taken for psycopg 3, not SQLAlchemy's default psycopg2 (which is not installed)."""
    if not url:
        return url
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ConfigError(
            f"--db (env RUNLEDGER_DB) must be a URL such as postgresql+psycopg://..., got {_masked(url)!r}"
        )
    if scheme in ("postgres", "postgresql"):
        url = f"postgresql+psycopg://{rest}"
    elif scheme not in ("postgresql+psycopg", "sqlite", "sqlite+pysqlite"):
        raise ConfigError(
            f"--db (env RUNLEDGER_DB) must be a PostgreSQL (postgresql+psycopg://...) or SQLite (sqlite:///...) URL, "
            f"got one for {scheme!r}"
        )
    try:
        parsed = make_url(url)
        if parsed.port is not None and not 0 < parsed.port < 65536:  # parsed on access: no number raises
            raise ValueError(f"port {parsed.port} is not from 1 to 65535")
    except (ArgumentError, ValueError) as exc:
        raise ConfigError(f"--db (env RUNLEDGER_DB) {_masked(url)!r} is not a valid URL: {exc}") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise ConfigError(
            "--db (env RUNLEDGER_DB) names an in-memory SQLite database, which each connection would see empty: "
            "give a file, sqlite:///path/to/runledger.db"
        )
    return url


def _masked(url: str) -> str:
    """The URL with any password replaced, for messages: a mistyped URL still holds the real password, which
    may itself hold '/', ':' or '@' (unencoded, as people type them): all from the user's ':' to the last '@'."""
    at = url.rfind("@")
    if at < 0:
        return url
    scheme = re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/*", url)
    start = scheme.end() if scheme else 0
    colon = url.find(":", start, at)
    return url if colon < 0 else f"{url[: colon + 1]}***{url[at:]}"


def _s3_endpoint(endpoint: str) -> str:
    """`host:port` (or a bare host); a port that is no number from 1 to 65535 is refused here, not at first use."""
    bare = re.sub(r"^https?://", "", endpoint, flags=re.IGNORECASE).rstrip("/")  # as the S3 store takes it
    host, sep, port = bare.rpartition(":")
    if sep and not host.endswith("]") and ":" in host:  # a bare IPv6 address: no port to check
        return endpoint
    if sep and not (port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(
            f"--s3-endpoint (env RUNLEDGER_S3_ENDPOINT) must be host:port with a port from 1 to 65535, got {endpoint!r}"
        )
    return endpoint


def from_argv(argv: Sequence[str], env: Mapping[str, str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(prog="runledger serve")
    add_arguments(parser)
    return from_args(parser.parse_args(list(argv)), env)
