#!/usr/bin/env bash
# On the GPU machine the project is a plain copy, not installed: link its top-level folders where an
# install maps them (pyproject's package-dir: coevolve.policy = policy/, ...), so `python -m coevolve`
# runs from the repository root with PYTHONPATH=. The links live in that throwaway copy only.
set -euo pipefail
cd "$(dirname "$0")/.."
for d in flows policy reward revision data; do ln -sfn "../$d" "coevolve/$d"; done
