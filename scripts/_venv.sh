# Sourced by scripts/demo and scripts/test: make .venv on first use and keep it in step with
# pyproject.toml. Usage: ensure_venv EXTRAS   (e.g. "" or "test")
ensure_venv() {
  local extras=$1 python=${PYTHON:-python3} stamp=.venv/.installed-${1:-base}
  if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "error: Python 3.11 or newer is needed as '$python' (set PYTHON=... to pick one)" >&2
    exit 1
  fi
  if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv || { echo "error: '$python -m venv' failed (on Debian: apt-get install python3-venv)" >&2; exit 1; }
  fi
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setting up .venv (${extras:-base} dependencies); log in .venv/install.log" >&2
    if ! { .venv/bin/python -m pip install --upgrade pip &&
           .venv/bin/python -m pip install -e ".${extras:+[$extras]}"; } > .venv/install.log 2>&1; then
      tail -n 20 .venv/install.log >&2
      echo "error: installing the Python dependencies failed (full log: .venv/install.log)" >&2
      exit 1
    fi
    touch "$stamp"
  fi
}

# Run as root, or through sudo when there is one.
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}
