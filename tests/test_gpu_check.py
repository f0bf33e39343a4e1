"""scripts/gpu-check: every step's result lands in one JSON file, and a failed step fails the check.

The bot's commands are replaced by a stand-in interpreter (the real ones load models); the merge runs for real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = f"""#!/usr/bin/env bash
# `-m bot ...` prints what the real command would (JSON for doctor); anything else is the real interpreter.
if [ "$1" = "-m" ]; then
  shift 2
  echo "$*" >>"$CALLS"
  case "$1" in
    doctor) echo '{{"exit_code": 0, "default_can_run": true}}' ;;
    generate) echo "Paris is the capital of France."; [ "$4" = "$FAIL_MODEL" ] && exit 3 ;;
    bench) for a in "$@"; do [ "$prev" = "--out" ] && echo '{{"results": []}}' >"$a"; prev="$a"; done ;;
  esac
  exit 0
fi
exec {sys.executable} "$@"
"""


def run_check(tmp_path: Path, fail_model: str = "") -> tuple[int, dict, list[str]]:
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out = tmp_path / "check.json"
    calls = tmp_path / "calls"
    env = {**os.environ, "PYTHON": str(fake), "CALLS": str(calls), "FAIL_MODEL": fail_model}
    proc = subprocess.run([str(ROOT / "scripts" / "gpu-check"), str(out)], env=env, capture_output=True, text=True,
                          timeout=60)
    return proc.returncode, json.loads(out.read_text()), calls.read_text().splitlines()


def test_every_step_is_in_one_json_file(tmp_path: Path) -> None:
    code, result, calls = run_check(tmp_path)
    assert code == 0 and result["passed"]
    assert list(result["steps"]) == ["doctor", "prepare", "doctor_load", "generate_smollm2-gptq",
                                     "generate_smollm2-awq", "bench_engines", "bench_concurrency"]
    assert result["steps"]["doctor_load"]["result"]["default_can_run"] is True
    assert "Paris" in result["steps"]["generate_smollm2-awq"]["stdout"]
    assert result["steps"]["bench_engines"]["result"] == {"results": []}
    assert result["steps"]["bench_concurrency"]["result"] == {"results": []}
    assert "doctor --json --load" in calls and any(c.startswith("bench engines --quick") for c in calls)
    assert any(c.startswith("bench concurrency --quick") for c in calls)


def test_a_failed_step_fails_the_check_and_is_recorded(tmp_path: Path) -> None:
    code, result, _ = run_check(tmp_path, fail_model="smollm2-awq")
    assert code == 1 and not result["passed"]
    assert result["steps"]["generate_smollm2-awq"]["exit_code"] == 3
    assert result["steps"]["generate_smollm2-gptq"]["exit_code"] == 0
