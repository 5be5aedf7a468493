"""TOML config -> typed, validated, frozen objects.

Why pydantic: it reports *every* problem at once with its location, which we turn into
``FILE: key.path: problem`` lines (the contract of ``relayd check-config``). Unknown keys are errors, because
a misspelt key that is silently ignored is the classic way to run a mail server with a policy you did not
mean. The config is loaded once and passed in; nothing reads it from a global.

Relative paths are taken relative to the working directory the daemon runs in (systemd sets it to the state
directory), so the example config runs as-is from the repository root with its state under ``var/``.

The package: :mod:`~relayd.config.values` (durations, sizes, rates, ``host:port``),
:mod:`~relayd.config.schema` (the sections and accounts),
:mod:`~relayd.config.loading` (:func:`load` and the file checks), :mod:`~relayd.config.audit` (the example
password refusal and the warnings). Everyone imports from here.
"""

from relayd.config.audit import refuse_example_passwords, warnings
from relayd.config.loading import load, load_shaping_file
from relayd.config.schema import (
    WEBHOOK_EVENTS,
    AccountConfig,
    BareNewline,
    CapsConfig,
    Config,
    DeliveryConfig,
    DkimConfig,
    HttpConfig,
    InboundConfig,
    ListConfig,
    PolicyConfig,
    PoolConfig,
    QueueConfig,
    ServerConfig,
    ShapingConfig,
    ShapingFile,
    StoreConfig,
    SubmissionConfig,
    ThresholdsConfig,
    TlsLevelName,
    WebhookConfig,
    WebhookEvent,
)
from relayd.config.values import (
    Duration,
    HostPort,
    Network,
    Rate,
    RateLimit,
    Size,
    domain_key,
    is_loopback_host,
    parse_duration,
    parse_hostport,
    parse_rate,
    parse_size,
)
from relayd.core.errors import ConfigError

__all__ = [
    "WEBHOOK_EVENTS",
    "AccountConfig",
    "BareNewline",
    "CapsConfig",
    "Config",
    "ConfigError",
    "DeliveryConfig",
    "DkimConfig",
    "Duration",
    "HostPort",
    "HttpConfig",
    "InboundConfig",
    "ListConfig",
    "Network",
    "PolicyConfig",
    "PoolConfig",
    "QueueConfig",
    "Rate",
    "RateLimit",
    "ServerConfig",
    "ShapingConfig",
    "ShapingFile",
    "Size",
    "StoreConfig",
    "SubmissionConfig",
    "ThresholdsConfig",
    "TlsLevelName",
    "WebhookConfig",
    "WebhookEvent",
    "domain_key",
    "is_loopback_host",
    "load",
    "load_shaping_file",
    "parse_duration",
    "parse_hostport",
    "parse_rate",
    "parse_size",
    "refuse_example_passwords",
    "warnings",
]
