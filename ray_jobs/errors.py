"""User errors through Ray's wrappers: find the UserError a task, actor or Ray Train worker raised (``cause_of``),
print it as one line (``user_message``), and keep Ray's own tracebacks about it out of the log."""

from __future__ import annotations

import importlib
import logging
import sys

from ray.exceptions import RayTaskError

from shared.errors import UserError, first_line


def cause_of(exc: BaseException) -> BaseException:
    """The user-facing exception inside Ray's wrappers, if any: a task's or actor's error (``cause``), Ray Train's
    controller and worker-group failures (``controller_failure``, ``worker_failures``), chained exceptions."""
    pending, seen = [exc], 0
    while pending and seen < 64:
        error = pending.pop(0)
        seen += 1
        if isinstance(error, UserError):
            return error
        recovered = _user_error_in_text(error)
        if recovered is not None:
            return recovered
        inner = [getattr(error, "cause", None), getattr(error, "controller_failure", None), error.__cause__,
                 error.__context__, *(getattr(error, "worker_failures", None) or {}).values()]
        pending += [e for e in inner if isinstance(e, BaseException) and e is not error]
    return exc


def _user_error_in_text(error: BaseException) -> UserError | None:
    """An actor whose constructor raised dies with only the traceback's text (ActorDiedError.error_msg), and a Ray
    Data UDF's error reaches the driver as text inside UserCodeException: the user error is recovered from the
    text's last line that names one (``shared.placement.PlacementError: stage ...``)."""
    text = getattr(error, "error_msg", None) if getattr(error, "_actor_init_failed", False) else None
    if text is None and isinstance(error, RayTaskError):
        # a task's error whose cause did not survive pickling (Ray Data wraps a UDF's error in UserCodeException):
        # the task's traceback, in its text, still names it
        text = str(error)
    if not isinstance(text, str):
        return None
    for line in reversed([line.strip() for line in text.splitlines() if line.strip()]):
        name, sep, message = line.partition(": ")
        module, _, cls_name = name.rpartition(".")
        if sep and module.startswith("shared.") and cls_name.isidentifier():
            try:
                cls = getattr(importlib.import_module(module), cls_name)
            except (ImportError, AttributeError):
                return None
            if isinstance(cls, type) and issubclass(cls, UserError):
                return cls(message)
            return None
    return None


class _HideUserErrors(logging.Filter):
    """Drops Ray's own error logs (with their tracebacks) about a failure whose cause is a user error: the CLI
    prints that error as one line. Failures with any other cause are logged as Ray logs them."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        if error is None and isinstance(record.args, tuple):
            error = next((a for a in record.args if isinstance(a, BaseException)), None)
        return error is None or not isinstance(cause_of(error), UserError)


RAY_ERROR_LOGGERS = ("ray.data._internal.execution.streaming_executor_state", "ray.data.exceptions",
                     "ray.data._internal.execution.streaming_executor", "ray.train", "ray.train.v2")


def hide_user_error_logs() -> None:
    for name in RAY_ERROR_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _HideUserErrors) for f in logger.filters):
            logger.addFilter(_HideUserErrors())


def user_error_in(exc: BaseException) -> UserError | None:
    """The UserError that caused ``exc`` (also when it was raised inside a Ray task, actor or Train worker)."""
    inner = cause_of(exc)
    return inner if isinstance(inner, UserError) else None


def user_message(exc: BaseException) -> str | None:
    """One-line message for a user error (also when it was raised inside a Ray worker), else None."""
    inner = user_error_in(exc)
    return None if inner is None else first_line(inner.args[0] if inner.args else inner)


def stop_worker_output() -> None:
    """Stop echoing Ray workers' output on this driver, and drop what it held back (its deduplicator).

    Called once a job has failed with a user error, before the CLI prints it: Ray then cancels the failed job's
    other tasks, and what they print while they die (``KeyboardInterrupt`` tracebacks from cancelled tasks)
    reaches the terminal after the one-line error otherwise. Their logs stay in Ray's session folder.
    """
    worker = sys.modules.get("ray._private.worker")
    if worker is None:
        return
    worker.global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
    for deduplicator in (worker.stdout_deduplicator, worker.stderr_deduplicator):
        deduplicator.flush()

