#!/usr/bin/env bash
# Build docker/context/: the only thing `docker build` sees.
#
# Containers have no registry access, so every wheel the image installs is built or
# downloaded here, on the host, and COPY'd in (see docker/Dockerfile):
#   * storm-offload itself (pip wheel --no-deps of the project),
#   * torch as the CPU build pinned by a local version label (default: the +cpu build
#     installed in the project's venv, else torch==2.13.0+cpu) -- never a CUDA build,
#   * pyzmq, msgpack, xxhash, sortedcontainers, numpy and torch's own dependencies (filelock,
#     typing-extensions, setuptools, sympy, mpmath, networkx, jinja2, MarkupSafe, fsspec),
# all binary wheels for the interpreter that runs this script (CPython 3.11, x86_64
# glibc), which is what both the debootstrap'd bookworm base and python:3.11-slim have.
#
# Usage: docker/build-context.sh [CONTEXT_DIR]     (default: docker/context)
# Env:   PYTHON       interpreter whose pip is used (default: .venv/bin/python, else python3)
#        STORM_TORCH  torch requirement (default: torch==<venv version, forced to +cpu>)
# Re-running is cheap: wheels already in the directory are reused.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
ctx=${1:-$here/context}
wheels=$ctx/wheels      # dependencies
project=$ctx/project    # storm-offload itself

if [ -z "${PYTHON:-}" ]; then
  if [ -x "$root/.venv/bin/python" ]; then PYTHON=$root/.venv/bin/python; else PYTHON=python3; fi
fi
pip=("$PYTHON" -m pip --disable-pip-version-check)

mkdir -p "$wheels" "$project"
cp "$here/Dockerfile" "$ctx/Dockerfile"
printf '*\n!Dockerfile\n!wheels/\n!project/\n' > "$ctx/.dockerignore"

# Python-side pins: the versions this venv was tested with, where it has them.
pin() {  # pin NAME -> "NAME==VERSION" from $PYTHON's environment, or bare NAME
  local v
  v=$("$PYTHON" -c 'import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass' "$1")
  if [ -n "$v" ]; then echo "$1==$v"; else echo "$1"; fi
}

if [ -z "${STORM_TORCH:-}" ]; then
  tv=$(pin torch); tv=${tv#torch}; tv=${tv#==}
  if [ -z "$tv" ]; then tv=2.13.0; fi
  STORM_TORCH="torch==${tv%%+*}+cpu"
fi
case "$STORM_TORCH" in
  *+cpu*) ;;
  *) echo "build-context: STORM_TORCH=$STORM_TORCH is not pinned to a +cpu build" >&2; exit 2 ;;
esac

# 1. the project (always rebuilt: its version does not change between edits)
rm -f "$project"/*.whl "$wheels"/storm_offload-*.whl
"${pip[@]}" wheel --quiet --no-deps --wheel-dir "$project" "$root"

# 2. torch (CPU) + runtime deps with their dependencies, binary wheels only
"${pip[@]}" download --quiet --only-binary=:all: --dest "$wheels" \
  "$STORM_TORCH" "$(pin pyzmq)" "$(pin msgpack)" "$(pin xxhash)" "$(pin sortedcontainers)" "$(pin numpy)" \
  "$(pin filelock)" "$(pin typing_extensions)" "$(pin setuptools)" "$(pin sympy)" "$(pin mpmath)" \
  "$(pin networkx)" "$(pin jinja2)" "$(pin MarkupSafe)" "$(pin fsspec)"

# 3. guard: no CUDA stack may have sneaked in
if ls "$wheels" | grep -Eiq '^(nvidia_|triton-)'; then
  echo "build-context: CUDA wheels found in $wheels:" >&2
  ls "$wheels" | grep -Ei '^(nvidia_|triton-)' >&2
  exit 3
fi
if ! ls "$wheels" | grep -q '^torch-.*+cpu'; then
  echo "build-context: no +cpu torch wheel in $wheels" >&2
  exit 3
fi
echo "build-context: $(ls "$project") + $(ls "$wheels" | wc -l) dependency wheels, $(du -sh "$ctx" | cut -f1) in $ctx"
