"""The demo repository `webapp`: a tiny Python application with passing tests (`make test`)."""

from __future__ import annotations

import os
from pathlib import Path

from coordinator.errors import GitError
from coordinator.gitrepo import ident_env, run_git
from coordinator.repos import COORDINATOR_IDENT, Repo


def init_demo_repo(path: Path) -> Repo:
    """A tiny Python "webapp" with passing tests and one commit on main, by coordinator."""
    path = Path(os.path.abspath(path))
    if (path / ".git").exists():
        raise GitError(f"{path} is already a git repository; remove it or pick another folder")
    path.mkdir(parents=True, exist_ok=True)
    for rel, text in _DEMO_FILES.items():
        target = path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    run_git(["init", "-q", str(path)], git_dir=None, cwd=path.parent)
    gd = path / ".git"
    run_git(["symbolic-ref", "HEAD", "refs/heads/main"], git_dir=gd, cwd=gd)
    run_git(["add", "-A"], git_dir=gd, work_tree=path, cwd=path)
    tree = run_git(["write-tree"], git_dir=gd, work_tree=path, cwd=path).stdout.strip()
    message = "Demo webapp: login rules and their tests\n"
    sha = run_git(["commit-tree", tree], git_dir=gd, cwd=gd, env=ident_env(*COORDINATOR_IDENT), input=message)
    run_git(["update-ref", "refs/heads/main", sha.stdout.strip(), ""], git_dir=gd, cwd=gd)
    return Repo(path)


_DEMO_FILES = {
    "README.md": "# webapp\n\nA tiny demo application for coordinator. Run the tests with `make test`.\n",
    ".gitignore": "__pycache__/\n*.pyc\n",
    "Makefile": (
        "PYTHON ?= python3\n"
        "# No bytecode files: a test run must not write outside the files an order may change.\n"
        "export PYTHONDONTWRITEBYTECODE = 1\n\n"
        ".PHONY: test\n"
        "test:\n"
        "\t$(PYTHON) -m unittest discover -s tests -t . -v\n"
    ),
    "src/login.py": (
        '"""The webapp\'s login rules."""\n\n'
        "from typing import Optional\n\n\n"
        "def password_problem(password: str) -> Optional[str]:\n"
        '    """Why `password` cannot be used to log in, or None when it can."""\n'
        "    if not password:\n"
        '        return "Password required"\n'
        "    return None\n"
    ),
    "tests/__init__.py": "",
    "tests/test_login.py": (
        "import sys\n"
        "import unittest\n"
        "from pathlib import Path\n\n"
        'sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))\n\n'
        "from login import password_problem  # noqa: E402\n\n\n"
        "class LoginTest(unittest.TestCase):\n"
        "    def test_empty_password_is_refused(self) -> None:\n"
        '        self.assertEqual(password_problem(""), "Password required")\n\n'
        "    def test_ordinary_password_logs_in(self) -> None:\n"
        '        self.assertIsNone(password_problem("correct horse battery staple"))\n\n\n'
        'if __name__ == "__main__":\n'
        "    unittest.main()\n"
    ),
}


# -- helpers ------------------------------------------------------------------------------------


