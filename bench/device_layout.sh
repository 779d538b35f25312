#!/usr/bin/env bash
# On the GPU machine the project is a plain copy, not installed: link its top-level folders where an
# install maps them (pyproject's package-dir: coevolve.policy = policy/, ...), so `python -m coevolve`
# runs from the repository root with PYTHONPATH=. The links live in that throwaway copy only.
set -euo pipefail
cd "$(dirname "$0")/.."
for d in flows policy reward revision data; do ln -sfn "../$d" "coevolve/$d"; done

# The image's packages come without usable bytecode: every fresh interpreter compiled ~2,000 modules
# from source there (9.8 s of the 16.6 s a step process spent importing; bench_iteration.py --profile,
# 2026-12-01). Compile them once per machine, as pip does on a normal install; where a folder is
# read-only this does nothing and the imports stay slow. unchecked-hash: valid whatever the image's
# file times say.
for dir in "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" /tmp/site; do
    [ -d "$dir" ] && python3 -m compileall -q -j 0 --invalidation-mode unchecked-hash "$dir" >/dev/null 2>&1 || true
done
