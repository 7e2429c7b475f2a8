"""Headless Chromium for the leaderboard's browser tests (CI installs Debian's chromium)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y chromium; CI installs it)")


def chromium(tmp_path: Path, url: str, *extra: str) -> tuple[str, list[str]]:
    """Run headless chromium on ``url``: (stdout, console messages the page logged)."""
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *extra, url]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=180)
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return proc.stdout, console
