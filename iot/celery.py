"""The Celery application. Workers run with `make worker`.

Besides the task queue, each worker keeps a heartbeat in Redis (see
`iot.health`) so `/health/ready` can tell whether background work is being done.
"""

import os

from celery import Celery, bootsteps
from celery.signals import worker_ready

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "iot.settings")

app = Celery("iot")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


class WorkerHeartbeat(bootsteps.StartStopStep):
    """Writes this worker's liveness into Redis every few seconds."""

    requires = {"celery.worker.components:Timer"}

    def __init__(self, worker, **kwargs):
        self.tref = None

    def start(self, worker):
        from django.conf import settings

        from iot.health import worker_heartbeat_record

        def beat():
            try:
                worker_heartbeat_record(worker_name=worker.hostname)
            except Exception:  # a Redis hiccup must not kill the worker; readiness will show it
                pass

        beat()
        self.tref = worker.timer.call_repeatedly(settings.WORKER_HEARTBEAT_SECONDS, beat, priority=10)

    def stop(self, worker):
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None


app.steps["worker"].add(WorkerHeartbeat)


@worker_ready.connect
def warn_about_redis_eviction(sender=None, **kwargs) -> None:
    """Loud in the worker's log if Redis may evict keys (see `iot.health.redis_policy_check`)."""
    from iot.health import redis_policy_warn

    redis_policy_warn(process=f"worker {getattr(sender, 'hostname', '')}".strip())
