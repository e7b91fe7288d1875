"""The one error tree of coordinator.

Every error a user can cause is a `CoordinatorError`. The CLI turns it into one
line on stderr and its `exit_code`; nothing else reaches a user.

    CoordinatorError                 exit 1 unless said otherwise
    ├── UsageError                   exit 2: bad arguments, bad environment
    │   ├── WorkspaceError           no workspace, unreadable layout
    │   └── ConfigError              coordinator.yaml is invalid (names the key)
    ├── OrderError                   a work order breaks rules (carries every Problem)
    ├── NotFoundError                an unknown order id
    ├── StateError                   an operation not allowed in the order's status
    ├── SupervisorError              another supervisor runs; state is unusable
    ├── SandboxError                 the sandbox could not be set up (fail closed)
    ├── GitError                     a git operation the supervisor needs failed
    └── LLMError                     an LLM endpoint refused or broke its contract
        └── LLMAuthError             every model refused (401, 403) or had no key: never retried
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One broken rule: where it is and what to do about it."""

    field: str
    message: str
    path: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = self.path or "<order>"
        if self.line is not None:
            where = f"{where}:{self.line}"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"

    def as_dict(self) -> dict[str, object]:
        return {"path": self.path, "line": self.line, "field": self.field, "message": self.message}


class CoordinatorError(Exception):
    """Base of every error a user can cause. `str(e)` is the one line to show."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(CoordinatorError):
    exit_code = 2


class WorkspaceError(UsageError):
    pass


class ConfigError(UsageError):
    def __init__(self, message: str, *, path: str | None = None, key: str | None = None) -> None:
        where = path or "coordinator.yaml"
        text = f"{where}: {key}: {message}" if key else f"{where}: {message}"
        super().__init__(text)
        self.path = path
        self.key = key


class OrderError(CoordinatorError):
    """A work order that breaks one or more rules; all problems at once."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        first = str(self.problems[0]) if self.problems else "invalid work order"
        more = len(self.problems) - 1
        super().__init__(first + (f" (and {more} more)" if more > 0 else ""))


class NotFoundError(CoordinatorError):
    pass


class StateError(CoordinatorError):
    pass


class SupervisorError(CoordinatorError):
    exit_code = 2


class SandboxError(CoordinatorError):
    exit_code = 2


class GateError(CoordinatorError):
    """What was to be committed is not what the permission gate judged."""


class GitError(CoordinatorError):
    exit_code = 2


class LLMError(CoordinatorError):
    pass


class LLMAuthError(LLMError):
    pass
