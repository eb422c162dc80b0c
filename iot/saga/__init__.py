"""Durable sagas: a sequence of steps run one database transaction each, compensated in reverse on failure.

The protocol, and what it does and does not guarantee, is described in `iot.saga.runner`. The public API
(all importable from here):

    SagaDefinition, SagaStep, StepWait, StepFailed, SagaRunView, StepLogView, SagaKeyConflict, SagaRunNotFound,
    saga_register, saga_start, saga_signal, saga_cancel, saga_get

The services and selectors touch models, which Django loads after this package: they are imported on first
use (PEP 562 `__getattr__`), the definitions at once.
"""

from iot.saga.definitions import (
    SagaDefinition,
    SagaKeyConflict,
    SagaRunNotFound,
    SagaRunView,
    SagaStep,
    StepFailed,
    StepLogView,
    StepWait,
    saga_register,
)

_LAZY = {
    "saga_start": "iot.saga.services",
    "saga_signal": "iot.saga.services",
    "saga_cancel": "iot.saga.services",
    "saga_get": "iot.saga.selectors",
}

__all__ = [
    "SagaDefinition",
    "SagaKeyConflict",
    "SagaRunNotFound",
    "SagaRunView",
    "SagaStep",
    "StepFailed",
    "StepLogView",
    "StepWait",
    "saga_register",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
