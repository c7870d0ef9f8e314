#!/usr/bin/env bash
# The README's test command: make a virtualenv, install (torch==2.13.0 first:
# a looser pin would pull a multi-GB CUDA build), run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0
pip install -q -e '.[test]'
python -m pytest "$@"
