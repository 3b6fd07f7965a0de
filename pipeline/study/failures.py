"""What the study's executors that run units elsewhere (worker processes, Ray tasks) report when units fail;
importable without their optional extras, so `make study` catches it whichever executor ran."""

from __future__ import annotations


class UnitsFailed(RuntimeError):
    """Units that failed (name -> error), and the evaluations not run because their training failed."""

    def __init__(self, failed: dict[str, str], blocked: list[str]) -> None:
        self.failed, self.blocked = failed, blocked
        lines = [f"{len(failed)} unit(s) failed: " + "; ".join(f"{name} ({error})" for name, error in failed.items())]
        if blocked:
            lines.append(f"not run, their training failed: {', '.join(blocked)}")
        lines.append("rerun the same command to redo only these (finished units are kept)")
        super().__init__("\n".join(lines))


def error_line(error: BaseException) -> str:
    """One line for a unit's error: the cause a task wrapper carries (Ray's), else the error's last line."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}".splitlines()[0]
    return (str(error).strip().splitlines() or [type(error).__name__])[-1]
