"""Django settings, read from the environment (12-factor, via django-environ).

Every operational knob of the platform is an environment variable; the defaults
equal the seed service's. See `.env.example` for the full list.
"""

from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
# A local `.env` is honoured for development; real deployments set the environment.
if (BASE_DIR / ".env").is_file():
    environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

DEBUG = env.bool("DJANGO_DEBUG", default=False)

SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="")
if not SECRET_KEY:
    # No silent production default: only DEBUG gets a throwaway key.
    if not DEBUG:
        raise ImproperlyConfigured("DJANGO_SECRET_KEY must be set (or DJANGO_DEBUG=1 for local use).")
    SECRET_KEY = "insecure-debug-only-key"

ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "iot",
    "iot.idempotency",
    "iot.saga",
    "devices",
    "telemetry",
    "firmware",
    "alerts",
    "analytics",
    "mqtt",
    # The bug-fix benchmark (manage.py tasks_bench): no models, no URLs, only its command.
    "tasks_bench",
]

MIDDLEWARE = [
    "iot.metrics.RequestMetricsMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "iot.urls"
ASGI_APPLICATION = "iot.asgi.application"
WSGI_APPLICATION = "iot.wsgi.application"
APPEND_SLASH = False

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Postgres -----------------------------------------------------------------
# Connections come from a psycopg pool per process: under ASGI, persistent
# per-thread connections (CONN_MAX_AGE) would leak, a pool is the supported way.
DATABASES = {"default": env.db_url("DATABASE_URL", default="postgres://postgres@127.0.0.1:5432/iot")}
# Our backend = Django's, plus a fail-fast gate while Postgres is unreachable (see iot/db/postgresql/base.py).
DATABASES["default"]["ENGINE"] = "iot.db.postgresql"
DATABASES["default"]["CONN_MAX_AGE"] = 0
DATABASES["default"].setdefault("OPTIONS", {})
# libpq's own bound on a connection attempt to a host that does not answer (2 s is its minimum).
DATABASES["default"]["OPTIONS"].setdefault("connect_timeout", env.int("DB_CONNECT_TIMEOUT_SECONDS", default=2))
DATABASES["default"]["OPTIONS"]["pool"] = {
    "min_size": env.int("DB_POOL_MIN_SIZE", default=2),
    "max_size": env.int("DB_POOL_MAX_SIZE", default=20),
    # A request thread never waits for a free connection in normal operation (WEB_THREADS <
    # DB_POOL_MAX_SIZE, checked below), so waiting longer than this means Postgres is down: 503.
    "timeout": env.float("DB_POOL_TIMEOUT_SECONDS", default=1.0),
    # Bounds psycopg_pool's reconnection backoff (uncapped doubling up to this), so a fresh
    # attempt starts within seconds of Postgres returning.
    "reconnect_timeout": env.float("DB_POOL_RECONNECT_TIMEOUT_SECONDS", default=4.0),
}
# After a failed connection attempt, this process's requests fail at once (503) for this long,
# while one thread probes; see iot/db/postgresql/base.py.
DB_OUTAGE_FAIL_FAST_SECONDS = env.float("DB_OUTAGE_FAIL_FAST_SECONDS", default=0.5)
# Readiness waits at most this long for a database connection before reporting the outage.
HEALTH_DATABASE_TIMEOUT_SECONDS = env.float("HEALTH_DATABASE_TIMEOUT_SECONDS", default=0.8)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis --------------------------------------------------------------------
REDIS_URL = env.str("REDIS_URL", default="redis://127.0.0.1:6379/0")
REDIS_MAX_CONNECTIONS = env.int("REDIS_MAX_CONNECTIONS", default=100)
REDIS_SOCKET_TIMEOUT = env.float("REDIS_SOCKET_TIMEOUT", default=5.0)
# Every key the platform writes starts with this, so several deployments (or the
# test suite) can share one Redis server without touching each other's keys.
REDIS_KEY_PREFIX = env.str("REDIS_KEY_PREFIX", default="iot")
if "{" in REDIS_KEY_PREFIX or "}" in REDIS_KEY_PREFIX:
    # Redis Cluster hashes the first `{...}` of a key: braces in the prefix would override the hash tags
    # that keep each script's keys in one slot (iot/redis.py).
    raise ImproperlyConfigured("REDIS_KEY_PREFIX must not contain braces.")
# REDIS_URL names a node of a Redis Cluster (docs/SCALING.md): the platform's own keys then go through
# redis-py's cluster client. The Channels layer and the Celery broker need servers of their own then.
REDIS_CLUSTER = env.bool("REDIS_CLUSTER", default=False)
# The Channels layer's Redis (WebSocket fan-out between web processes): REDIS_URL unless set.
CHANNEL_LAYER_REDIS_URL = env.str("CHANNEL_LAYER_REDIS_URL", default=REDIS_URL)

CACHES = {
    "default": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": f"{REDIS_KEY_PREFIX}:django",
        "OPTIONS": {"CLIENT_CLASS": "django_redis.client.DefaultClient"},
    }
}

# The layer's connections get the same timeouts as every other Redis client here (left unset, redis-py
# applies its own 5 s); `iot.channel_layer` keeps the layer's blocking receive inside that read timeout.
# The client name marks the layer's connections in CLIENT LIST.
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "iot.channel_layer.RedisChannelLayer",
        "CONFIG": {
            "hosts": [
                {
                    "address": CHANNEL_LAYER_REDIS_URL,
                    "socket_timeout": REDIS_SOCKET_TIMEOUT,
                    "socket_connect_timeout": REDIS_SOCKET_TIMEOUT,
                    "client_name": f"{REDIS_KEY_PREFIX}:channels",
                }
            ],
            "prefix": f"{REDIS_KEY_PREFIX}:channels:",
        },
    }
}

# --- Celery -------------------------------------------------------------------
# Redis (the default) or RabbitMQ (`amqp://user:password@host:5672/vhost`): nothing else changes
# (docs/SCALING.md, "Celery's broker").
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default=REDIS_URL)
CELERY_RESULT_BACKEND = None
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=False)
# The queue every task goes to: several deployments on one RabbitMQ vhost need one each (on Redis the
# key prefix below already keeps them apart).
CELERY_TASK_DEFAULT_QUEUE = env.str("CELERY_TASK_DEFAULT_QUEUE", default="celery")
# RabbitMQ only: "quorum" makes that queue a replicated quorum queue (countdowns then wait in RabbitMQ's
# delay queues instead of in a worker); "classic" otherwise (docs/SCALING.md).
CELERY_TASK_DEFAULT_QUEUE_TYPE = env.str("CELERY_TASK_DEFAULT_QUEUE_TYPE", default="classic")
if CELERY_TASK_DEFAULT_QUEUE_TYPE not in ("classic", "quorum"):
    raise ImproperlyConfigured("CELERY_TASK_DEFAULT_QUEUE_TYPE must be classic or quorum.")
# Celery's delayed delivery binds only to topic exchanges; a queue's type and its exchange's can't change
# in place, so a switch to quorum takes a new CELERY_TASK_DEFAULT_QUEUE.
CELERY_TASK_DEFAULT_EXCHANGE_TYPE = "topic" if CELERY_TASK_DEFAULT_QUEUE_TYPE == "quorum" else "direct"
if CELERY_BROKER_URL.split("://", 1)[0] in ("amqp", "amqps", "pyamqp"):
    # Publisher confirms: `apply_async` returns once RabbitMQ has the message (as Redis' LPUSH reply does),
    # not when it left this process.
    CELERY_BROKER_TRANSPORT_OPTIONS = {"confirm_publish": True}
else:
    CELERY_BROKER_TRANSPORT_OPTIONS = {"global_keyprefix": f"{REDIS_KEY_PREFIX}:celery:"}
if REDIS_CLUSTER and REDIS_URL in (CELERY_BROKER_URL, CHANNEL_LAYER_REDIS_URL):
    raise ImproperlyConfigured(
        "With REDIS_CLUSTER, set CELERY_BROKER_URL (RabbitMQ, or a Redis server outside the cluster) and "
        "CHANNEL_LAYER_REDIS_URL (a Redis server outside the cluster): neither speaks Redis Cluster."
    )
CELERY_BEAT_SCHEDULE = {
    "idempotency-keys-cleanup": {
        "task": "iot.idempotency.tasks.idempotency_keys_cleanup",
        "schedule": env.float("IDEMPOTENCY_CLEANUP_INTERVAL_SECONDS", default=3600.0),
    },
}
WORKER_HEARTBEAT_SECONDS = env.float("WORKER_HEARTBEAT_SECONDS", default=5.0)

# --- Serving (iot/asgi_bridge.py) -----------------------------------------------
# Request threads per web process; each holds at most one database connection.
WEB_THREADS = env.int("WEB_THREADS", default=16)
# Liveness, readiness and metrics run on their own threads, so a saturated request pool
# (e.g. every thread waiting on a dead database) never delays them.
WEB_OPS_THREADS = env.int("WEB_OPS_THREADS", default=2)
# Larger request bodies are refused (413) before a thread is taken; the upload paths have
# MAX_UPLOAD_BODY_BYTES instead (firmware section below).
MAX_REQUEST_BODY_BYTES = env.int("MAX_REQUEST_BODY_BYTES", default=4 * 1024 * 1024)
if DATABASES["default"]["OPTIONS"]["pool"]["max_size"] < WEB_THREADS + WEB_OPS_THREADS:
    raise ImproperlyConfigured(
        "WEB_THREADS + WEB_OPS_THREADS must not exceed DB_POOL_MAX_SIZE: a thread waiting for a pooled "
        "connection would be taken for a database outage after DB_POOL_TIMEOUT_SECONDS."
    )

# --- Auth & API ---------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "iot.api.authentication.CachedTokenAuthentication",
        "devices.authentication.DeviceTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["iot.api.permissions.IsOperator"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["iot.api.parsers.StrictJSONParser"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "iot.api.exceptions.api_exception_handler",
    "UNAUTHENTICATED_USER": None,
}
if DEBUG:
    REST_FRAMEWORK["DEFAULT_RENDERER_CLASSES"].append("rest_framework.renderers.BrowsableAPIRenderer")

SPECTACULAR_SETTINGS = {
    "TITLE": "IoT fleet platform API",
    "DESCRIPTION": "Register devices, read and update them, send their telemetry and read it back. "
    "Operators send `Authorization: Token <key>`; a device sends `Authorization: Device <token>` "
    "(the `device_token` of its registration).",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    # Swagger UI and Redoc from this server's static files (drf-spectacular-sidecar), not a CDN:
    # the docs work without internet access.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# --- Platform knobs (defaults equal the seed's) -------------------------------
IDEMPOTENCY_KEY_TTL_SECONDS = env.int("IDEMPOTENCY_KEY_TTL_SECONDS", default=24 * 3600)
IDEMPOTENCY_WAIT_SECONDS = env.float("IDEMPOTENCY_WAIT_SECONDS", default=5.0)
IDEMPOTENCY_KEY_MAX_LENGTH = 255

DEVICE_CACHE_TTL_SECONDS = env.int("DEVICE_CACHE_TTL_SECONDS", default=300)
# Operator tokens cached in Redis (iot/api/authentication.py); also how long a revocation's
# in-transaction hold keeps the cache bypassed if its after-commit invalidation fails.
TOKEN_CACHE_TTL_SECONDS = env.int("TOKEN_CACHE_TTL_SECONDS", default=300)
# A cache fill computed from a database read older than this is refused, so a
# reader that stalls between its read and its fill can never store old data.
CACHE_FILL_MAX_AGE_MS = env.int("CACHE_FILL_MAX_AGE_MS", default=5000)
# A device credential's hash -> device id, cached for authentication (devices/selectors.py). A
# credential never moves to another device, so nothing invalidates the mapping; it ages out. The
# device's own state is read through the version-guarded device cache on every request.
DEVICE_TOKEN_CACHE_TTL_SECONDS = env.int("DEVICE_TOKEN_CACHE_TTL_SECONDS", default=3600)

RATE_LIMIT_TELEMETRY_PER_DEVICE = env.int("RATE_LIMIT_TELEMETRY_PER_DEVICE", default=100)
RATE_LIMIT_WINDOW_SECONDS = env.int("RATE_LIMIT_WINDOW_SECONDS", default=60)
RATE_LIMIT_GLOBAL_PER_SECOND = env.int("RATE_LIMIT_GLOBAL_PER_SECOND", default=10_000)

EVENT_QUEUE_MAX_SIZE = env.int("EVENT_QUEUE_MAX_SIZE", default=10_000)
BACKPRESSURE_QUEUE_THRESHOLD = env.int("BACKPRESSURE_QUEUE_THRESHOLD", default=8_000)
BACKPRESSURE_REJECT_THRESHOLD = env.int("BACKPRESSURE_REJECT_THRESHOLD", default=9_500)
# Room in the queue reserved at admission for a request's event is given back after this long if
# the request never published it (its process died between admission and commit; iot/event_queue.py).
EVENT_QUEUE_RESERVATION_TTL_SECONDS = env.float("EVENT_QUEUE_RESERVATION_TTL_SECONDS", default=30.0)
# A consumer's unacknowledged entry idle this long is reclaimed by another consumer.
EVENT_QUEUE_CLAIM_IDLE_MS = env.int("EVENT_QUEUE_CLAIM_IDLE_MS", default=30_000)
# An entry delivered this many times without success goes to the dead-letter stream.
EVENT_QUEUE_MAX_DELIVERIES = env.int("EVENT_QUEUE_MAX_DELIVERIES", default=5)
EVENT_QUEUE_DEAD_LETTER_MAX_LEN = env.int("EVENT_QUEUE_DEAD_LETTER_MAX_LEN", default=10_000)
# Extra modules with @event_handler functions (besides every app's events.py).
EVENT_HANDLER_MODULES = env.list("EVENT_HANDLER_MODULES", default=[])

TELEMETRY_RETENTION_SECONDS = env.int("TELEMETRY_RETENTION_SECONDS", default=30 * 24 * 3600)
TELEMETRY_BATCH_MAX_POINTS = env.int("TELEMETRY_BATCH_MAX_POINTS", default=1000)

# --- Observability ------------------------------------------------------------
# With several worker processes, prometheus_client aggregates through files here.
PROMETHEUS_MULTIPROC_DIR = env.str("PROMETHEUS_MULTIPROC_DIR", default="")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {"django.request": {"level": "ERROR"}},
}

# --- i18n / static ------------------------------------------------------------
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "var" / "staticfiles"

# --- Telemetry pipeline (telemetry app) ----------------------------------------
# Points stamped further ahead of the server clock than this are refused (422).
TELEMETRY_MAX_FUTURE_SECONDS = env.int("TELEMETRY_MAX_FUTURE_SECONDS", default=300)
# Daily partitions are created this many days ahead (and for the whole retention window behind).
TELEMETRY_PARTITION_PREMAKE_DAYS = env.int("TELEMETRY_PARTITION_PREMAKE_DAYS", default=7)
# Analytics: messages_per_second is the average over this many past seconds (at most 300, the
# lifetime of the per-second counters).
ANALYTICS_RATE_WINDOW_SECONDS = env.int("ANALYTICS_RATE_WINDOW_SECONDS", default=60)
if not 1 <= ANALYTICS_RATE_WINDOW_SECONDS <= 300:
    raise ImproperlyConfigured("ANALYTICS_RATE_WINDOW_SECONDS must be between 1 and 300.")
# Message counts: minutes of received points that ended this long ago are counted from Postgres
# (exact; the Redis counters of the minutes since are read on top), every so many seconds.
TELEMETRY_COUNT_RECONCILE_GRACE_SECONDS = env.int("TELEMETRY_COUNT_RECONCILE_GRACE_SECONDS", default=60)
CELERY_BEAT_SCHEDULE["telemetry-message-counts-reconcile"] = {
    "task": "telemetry.tasks.telemetry_message_counts_reconciliation",
    "schedule": env.float("TELEMETRY_COUNT_RECONCILE_INTERVAL_SECONDS", default=30.0),
}
CELERY_BEAT_SCHEDULE["telemetry-partitions-maintain"] = {
    "task": "telemetry.tasks.telemetry_partitions_maintenance",
    "schedule": env.float("TELEMETRY_PARTITION_MAINTENANCE_INTERVAL_SECONDS", default=3600.0),
}

# --- Idempotency: stored responses are encrypted (iot/idempotency/crypto.py) ------
# A replay returns the first response, and a registration's carries the device's credential,
# so stored responses are encrypted with a key derived (HKDF-SHA256, its own context) from this
# secret, or from DJANGO_SECRET_KEY when unset. To rotate, move the previous secret to
# IDEMPOTENCY_ENCRYPTION_OLD_KEYS (comma-separated) for IDEMPOTENCY_KEY_TTL_SECONDS: replays of
# bodies stored before then still open; a body no configured key opens is answered 409.
IDEMPOTENCY_ENCRYPTION_KEY = env.str("IDEMPOTENCY_ENCRYPTION_KEY", default="")
IDEMPOTENCY_ENCRYPTION_OLD_KEYS = env.list("IDEMPOTENCY_ENCRYPTION_OLD_KEYS", default=[])
if IDEMPOTENCY_ENCRYPTION_KEY and len(IDEMPOTENCY_ENCRYPTION_KEY) < 32:
    raise ImproperlyConfigured("IDEMPOTENCY_ENCRYPTION_KEY must be at least 32 characters of random data.")

# --- Event queue reconciliation (iot/event_queue.py, iot/tasks.py) ----------------
# How often Celery beat recounts the queue's depth from the stream and re-delivers lost entries.
EVENT_QUEUE_RECONCILE_INTERVAL_SECONDS = env.float("EVENT_QUEUE_RECONCILE_INTERVAL_SECONDS", default=300.0)
# A longer stream is a backlog being worked off: reconciling it would block Redis (~3.4 ms per 1,000 entries).
EVENT_QUEUE_RECONCILE_MAX_ENTRIES = env.int("EVENT_QUEUE_RECONCILE_MAX_ENTRIES", default=10_000)
CELERY_BEAT_SCHEDULE["event-queue-reconcile"] = {
    "task": "iot.tasks.event_queue_reconciliation",
    "schedule": EVENT_QUEUE_RECONCILE_INTERVAL_SECONDS,
}

# --- Circuit breaker (iot/circuit_breaker.py) ---
# Consecutive failed calls that open a breaker (a success resets the count).
CIRCUIT_BREAKER_FAILURE_THRESHOLD = env.int("CIRCUIT_BREAKER_FAILURE_THRESHOLD", default=5)
# How long an open breaker refuses calls (Redis' clock) before letting probes through (half-open).
CIRCUIT_BREAKER_TIMEOUT_SECONDS = env.float("CIRCUIT_BREAKER_TIMEOUT_SECONDS", default=60.0)
# Probes in flight at a time while half-open, across all processes.
CIRCUIT_BREAKER_HALF_OPEN_MAX_CALLS = env.int("CIRCUIT_BREAKER_HALF_OPEN_MAX_CALLS", default=3)
# A probe's slot is freed after this long even if its worker never reports (it died): keep it above the
# longest call (a webhook: WEBHOOK_CONNECT_TIMEOUT_SECONDS + WEBHOOK_READ_TIMEOUT_SECONDS).
CIRCUIT_BREAKER_PROBE_LEASE_SECONDS = env.float("CIRCUIT_BREAKER_PROBE_LEASE_SECONDS", default=30.0)
if CIRCUIT_BREAKER_FAILURE_THRESHOLD < 1 or CIRCUIT_BREAKER_HALF_OPEN_MAX_CALLS < 1:
    raise ImproperlyConfigured("CIRCUIT_BREAKER_FAILURE_THRESHOLD and _HALF_OPEN_MAX_CALLS must be at least 1.")
if CIRCUIT_BREAKER_TIMEOUT_SECONDS <= 0 or CIRCUIT_BREAKER_PROBE_LEASE_SECONDS <= 0:
    raise ImproperlyConfigured("CIRCUIT_BREAKER_TIMEOUT_SECONDS and _PROBE_LEASE_SECONDS must be positive.")

# --- Outbound webhooks (iot/outbound.py) ---
# Webhook URLs resolving to loopback, private (RFC 1918, ULA), shared (100.64/10) or reserved addresses are
# refused unless this is on (development, or receivers on your own network). Link-local (the cloud metadata
# address 169.254.169.254), unspecified and multicast addresses are refused either way.
ALERT_WEBHOOK_ALLOW_PRIVATE = env.bool("ALERT_WEBHOOK_ALLOW_PRIVATE", default=False)
# Connecting (DNS, TCP and TLS handshake), and then each read or write, may take this long.
WEBHOOK_CONNECT_TIMEOUT_SECONDS = env.float("WEBHOOK_CONNECT_TIMEOUT_SECONDS", default=2.0)
WEBHOOK_READ_TIMEOUT_SECONDS = env.float("WEBHOOK_READ_TIMEOUT_SECONDS", default=5.0)
# Email channels go through Django's email backend: EMAIL_URL as django-environ reads it
# (smtp://user:password@host:587, smtp+tls://..., consolemail:// prints instead of sending).
_email = env.email_url("EMAIL_URL", default="consolemail://")
EMAIL_BACKEND = _email["EMAIL_BACKEND"]
EMAIL_HOST = _email.get("EMAIL_HOST") or "localhost"
EMAIL_PORT = _email.get("EMAIL_PORT") or 25
EMAIL_HOST_USER = _email.get("EMAIL_HOST_USER") or ""
EMAIL_HOST_PASSWORD = _email.get("EMAIL_HOST_PASSWORD") or ""
EMAIL_USE_TLS = bool(_email.get("EMAIL_USE_TLS", False))
EMAIL_USE_SSL = bool(_email.get("EMAIL_USE_SSL", False))
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="iot-alerts@localhost")
# Each connection to the mail server and each of its answers waits at most this long.
EMAIL_TIMEOUT_SECONDS = env.float("EMAIL_TIMEOUT_SECONDS", default=5.0)

# --- Alert notifications: the outbox (alerts/tasks.py) ---
# A notification not delivered by then is marked expired (logged and counted), never retried again.
# How many rule scopes (a device's, a group's) each process keeps parsed in memory, keyed by version.
ALERT_RULES_LOCAL_CACHE_SIZE = env.int("ALERT_RULES_LOCAL_CACHE_SIZE", default=10_000)
ALERT_NOTIFICATION_TTL_SECONDS = env.float("ALERT_NOTIFICATION_TTL_SECONDS", default=86_400.0)
# Retries back off exponentially from this delay (with jitter) up to the cap.
ALERT_NOTIFICATION_RETRY_BASE_SECONDS = env.float("ALERT_NOTIFICATION_RETRY_BASE_SECONDS", default=2.0)
ALERT_NOTIFICATION_RETRY_MAX_SECONDS = env.float("ALERT_NOTIFICATION_RETRY_MAX_SECONDS", default=300.0)
# A claimed row is another worker's again after this long (its worker died mid-delivery): keep it above the
# longest call (WEBHOOK_CONNECT_TIMEOUT_SECONDS + WEBHOOK_READ_TIMEOUT_SECONDS).
ALERT_NOTIFICATION_LEASE_SECONDS = env.float("ALERT_NOTIFICATION_LEASE_SECONDS", default=30.0)
# How often the sweeper re-queues due rows whose task was lost, and how many per run.
ALERT_NOTIFICATION_SWEEP_INTERVAL_SECONDS = env.float("ALERT_NOTIFICATION_SWEEP_INTERVAL_SECONDS", default=30.0)
ALERT_NOTIFICATION_SWEEP_BATCH = env.int("ALERT_NOTIFICATION_SWEEP_BATCH", default=1000)
if ALERT_NOTIFICATION_TTL_SECONDS <= 0 or ALERT_NOTIFICATION_RETRY_BASE_SECONDS <= 0:
    raise ImproperlyConfigured("ALERT_NOTIFICATION_TTL_SECONDS and _RETRY_BASE_SECONDS must be positive.")
if ALERT_NOTIFICATION_LEASE_SECONDS <= WEBHOOK_CONNECT_TIMEOUT_SECONDS + WEBHOOK_READ_TIMEOUT_SECONDS:
    raise ImproperlyConfigured("ALERT_NOTIFICATION_LEASE_SECONDS must exceed the webhook connect + read timeouts.")
CELERY_BEAT_SCHEDULE["alert-notifications-sweep"] = {
    "task": "alerts.tasks.notifications_sweep",
    "schedule": ALERT_NOTIFICATION_SWEEP_INTERVAL_SECONDS,
}

# --- Sagas: the durable step runner (iot/saga/runner.py) ---
# How often the sweeper queues due runs whose task was lost, and StepWait deadlines that passed (a deadline is
# noticed up to this late).
SAGA_SWEEP_INTERVAL_SECONDS = env.float("SAGA_SWEEP_INTERVAL_SECONDS", default=5.0)
# A queued step may go this long without being picked up before the sweeper queues it again (a step that is
# executing holds its run's row lock and is never taken for lost, however long it runs).
SAGA_LEASE_SECONDS = env.float("SAGA_LEASE_SECONDS", default=60.0)
# A step's transient failures (and every failed compensation) are retried after this delay, doubling per
# attempt (with jitter) up to the cap.
SAGA_RETRY_BASE_SECONDS = env.float("SAGA_RETRY_BASE_SECONDS", default=0.5)
SAGA_RETRY_MAX_SECONDS = env.float("SAGA_RETRY_MAX_SECONDS", default=60.0)
# Extra modules that register saga definitions when imported (besides the apps' own ready()); tests use it.
SAGA_DEFINITION_MODULES = env.list("SAGA_DEFINITION_MODULES", default=[])
if min(SAGA_SWEEP_INTERVAL_SECONDS, SAGA_LEASE_SECONDS, SAGA_RETRY_BASE_SECONDS) <= 0:
    raise ImproperlyConfigured("SAGA_SWEEP_INTERVAL_SECONDS, _LEASE_SECONDS and _RETRY_BASE_SECONDS must be positive.")
if SAGA_RETRY_MAX_SECONDS < SAGA_RETRY_BASE_SECONDS:
    raise ImproperlyConfigured("SAGA_RETRY_MAX_SECONDS must not be below SAGA_RETRY_BASE_SECONDS.")
CELERY_BEAT_SCHEDULE["saga-sweep"] = {
    "task": "iot.saga.tasks.saga_sweep",
    "schedule": SAGA_SWEEP_INTERVAL_SECONDS,
}

# --- Files: firmware artifacts (firmware/artifacts.py) ---
# Uploaded files go through Django's storage API. The default is local disk under MEDIA_ROOT; any
# django-storages backend (S3, GCS, Azure) is a dotted class path in FILE_STORAGE_BACKEND with its
# options as JSON in FILE_STORAGE_OPTIONS. Files are served only through the authenticated API, never MEDIA_URL.
MEDIA_ROOT = env.str("MEDIA_ROOT", default=str(BASE_DIR / "var" / "media"))
STORAGES = {
    "default": {
        "BACKEND": env.str("FILE_STORAGE_BACKEND", default="django.core.files.storage.FileSystemStorage"),
        "OPTIONS": env.json("FILE_STORAGE_OPTIONS", default={}),
    },
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}

# --- Firmware updates (firmware/saga.py) ---
# A device that reports no result this long after its last sign of life (the dispatch, its last report, or
# the end of its maintenance window) counts as silent: the update fails and is rolled back.
FIRMWARE_DEVICE_TIMEOUT_SECONDS = env.float("FIRMWARE_DEVICE_TIMEOUT_SECONDS", default=600.0)
# Larger artifact uploads are refused (413) as soon as they pass it. The whole HTTP request is bounded
# first by MAX_UPLOAD_BODY_BYTES (below), which follows this limit unless set.
FIRMWARE_ARTIFACT_MAX_BYTES = env.int("FIRMWARE_ARTIFACT_MAX_BYTES", default=256 * 1024 * 1024)
if FIRMWARE_DEVICE_TIMEOUT_SECONDS <= 0 or FIRMWARE_ARTIFACT_MAX_BYTES <= 0:
    raise ImproperlyConfigured("FIRMWARE_DEVICE_TIMEOUT_SECONDS and FIRMWARE_ARTIFACT_MAX_BYTES must be positive.")
# Serving (iot/asgi_bridge.py), here because it follows the artifact limit: request bodies to paths fully
# matching one of UPLOAD_PATH_PATTERNS (regular expressions; default: the artifact upload) may be this large
# instead of MAX_REQUEST_BODY_BYTES. They are spooled to a temporary file past 64 KiB, never held in RAM.
# Default: the artifact limit plus 64 KiB for the multipart envelope.
MAX_UPLOAD_BODY_BYTES = env.int("MAX_UPLOAD_BODY_BYTES", default=FIRMWARE_ARTIFACT_MAX_BYTES + 64 * 1024)
UPLOAD_PATH_PATTERNS = env.list("UPLOAD_PATH_PATTERNS", default=[r"/firmware/versions/[^/]+/artifact/?"])
if MAX_UPLOAD_BODY_BYTES <= 0:
    raise ImproperlyConfigured("MAX_UPLOAD_BODY_BYTES must be positive.")

# --- Staged firmware rollouts (firmware/rollouts.py) ---
# How often Celery beat advances every rollout with work left (besides the advance queued when one of its
# updates ends): a stage passes, or a stop's cancellations go on, at most this late if such a task was lost.
FIRMWARE_ROLLOUT_ADVANCE_INTERVAL_SECONDS = env.float("FIRMWARE_ROLLOUT_ADVANCE_INTERVAL_SECONDS", default=5.0)
# Updates a rollout creates per transaction (the rollout row is locked meanwhile); a stage of 100 000
# devices is that many short transactions, not one long one.
FIRMWARE_ROLLOUT_BATCH_SIZE = env.int("FIRMWARE_ROLLOUT_BATCH_SIZE", default=200)
if FIRMWARE_ROLLOUT_ADVANCE_INTERVAL_SECONDS <= 0 or FIRMWARE_ROLLOUT_BATCH_SIZE <= 0:
    raise ImproperlyConfigured("FIRMWARE_ROLLOUT_ADVANCE_INTERVAL_SECONDS and _BATCH_SIZE must be positive.")
CELERY_BEAT_SCHEDULE["firmware-rollouts-advance"] = {
    "task": "firmware.tasks.rollouts_advance",
    "schedule": FIRMWARE_ROLLOUT_ADVANCE_INTERVAL_SECONDS,
    "options": {"expires": FIRMWARE_ROLLOUT_ADVANCE_INTERVAL_SECONDS},
}

# --- Device liveness (devices/tasks.py) ---
# An `active` device not seen (no accepted telemetry) for this long becomes `inactive`, and `active` again
# with its next point; ThingsBoard's inactivity timeout (300 s by default) is the model. Set it above the
# longest interval at which your devices report, or they flap. `last_seen` moves at most once a second.
DEVICE_INACTIVE_AFTER_SECONDS = env.int("DEVICE_INACTIVE_AFTER_SECONDS", default=300)
# How often the sweep runs (Celery beat): a device turns inactive up to this late.
DEVICE_LIVENESS_INTERVAL_SECONDS = env.float("DEVICE_LIVENESS_INTERVAL_SECONDS", default=30.0)
if DEVICE_INACTIVE_AFTER_SECONDS < 2 or DEVICE_LIVENESS_INTERVAL_SECONDS <= 0:
    raise ImproperlyConfigured(
        "DEVICE_INACTIVE_AFTER_SECONDS must be at least 2 (last_seen moves once a second) and "
        "DEVICE_LIVENESS_INTERVAL_SECONDS positive."
    )
CELERY_BEAT_SCHEDULE["device-liveness-sweep"] = {
    "task": "devices.tasks.device_liveness_sweep",
    "schedule": DEVICE_LIVENESS_INTERVAL_SECONDS,
    # A sweep queued while no worker ran is superseded by the next one: don't pile them up.
    "options": {"expires": DEVICE_LIVENESS_INTERVAL_SECONDS},
}

# --- Telemetry series for charts (telemetry/series.py) ---
# GET /telemetry/{device_id}/{metric}/series answers at most this many buckets; a longer range or a
# shorter interval is a 400 that names the smallest interval that fits.
TELEMETRY_SERIES_MAX_BUCKETS = env.int("TELEMETRY_SERIES_MAX_BUCKETS", default=2000)
if TELEMETRY_SERIES_MAX_BUCKETS < 1:
    raise ImproperlyConfigured("TELEMETRY_SERIES_MAX_BUCKETS must be at least 1.")

# --- MQTT: the broker devices speak to, the ingest bridge (iot/mqtt.py, mqtt/bridge.py; docs/MQTT.md) ---
# `mqtt://host:port` (or `mqtts://`). `make run` starts an embedded broker and sets it when unset; empty: MQTT off.
MQTT_URL = env.str("MQTT_URL", default="")
# The platform's own account on the broker (the bridge, the OTA push): allowed every topic by /mqtt/auth.
MQTT_BRIDGE_USERNAME = env.str("MQTT_BRIDGE_USERNAME", default="iot-bridge")
MQTT_BRIDGE_PASSWORD = env.str("MQTT_BRIDGE_PASSWORD", default="")
# The shared secret the broker sends (header X-MQTT-Auth-Secret) when it asks POST /mqtt/auth and /mqtt/acl
# (mqtt/authentication.py). Empty: those endpoints refuse every caller, so no device can log in over MQTT.
# `make run` and the test platforms generate one for their embedded broker.
MQTT_AUTH_SECRET = env.str("MQTT_AUTH_SECRET", default="")
# Bridge n's client id is `<this>-<n>`: stable across restarts, so its persistent session (and the messages
# it had not acknowledged) is picked up again. Make it unique per machine when bridges run on several.
MQTT_BRIDGE_CLIENT_ID = env.str("MQTT_BRIDGE_CLIENT_ID", default="iot-bridge")
# A shared-subscription group (`$share/<group>/...`): several bridges split the messages. Only for a broker
# that supports it (EMQX, Mosquitto >= 1.6, HiveMQ); empty: no sharing, and `make worker` runs one bridge.
MQTT_SHARED_GROUP = env.str("MQTT_SHARED_GROUP", default="")
# Threads per bridge handling messages side by side; one device's messages always take the same one (in order).
MQTT_BRIDGE_LANES = env.int("MQTT_BRIDGE_LANES", default=4)
if MQTT_BRIDGE_LANES < 1:
    raise ImproperlyConfigured("MQTT_BRIDGE_LANES must be at least 1.")
# (MQTT_BRIDGE_COUNT, how many bridges `make worker` runs, is read by scripts/platform.py like EVENT_BUS_WORKER_COUNT.)
# The base URL devices reach the HTTP API at, for the links the platform sends them outside an HTTP answer
# (the artifact URL of an OTA offer pushed over MQTT). Empty: the links are paths (`/firmware/...`).
PUBLIC_BASE_URL = env.str("PUBLIC_BASE_URL", default="")
