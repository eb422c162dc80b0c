"""The IoT fleet platform project package: settings, routing, and the shared primitives.

The Celery app is imported here so that `shared_task` binds to it in every process.
"""

from iot.celery import app as celery_app

__all__ = ("celery_app",)
