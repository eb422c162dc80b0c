"""Background work of the firmware app: none of its own.

An update runs as a durable saga ("firmware.update", `firmware.saga`), advanced by the saga
runner's tasks (`iot.saga.tasks.saga_advance`, queued on commit by every step, and the
`saga_sweep` beat task that re-queues lost runs and passed deadlines): the retry policy and
the schedule live in the run's row, not here.
"""
