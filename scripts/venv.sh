# Sourced by test.sh and demo.sh: create (once) and activate the virtual environment, then install CPU torch 2.13.0
# first (a CPU build from the local index; an unpinned torch would pull a multi-GB CUDA build) and the package with
# the extras named in $1 (e.g. "test" or "demo").
VENV="${JDLORA_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
# pip's notes about the local index are noise; its failures are not: they stop the script.
quiet_pip() {
    local log
    log=$(python -m pip install -q "$@" 2>&1) || { echo "$log" | grep -v "^WARNING: Location" >&2; return 1; }
    echo "$log" | grep -v "^WARNING: Location" || true
}
quiet_pip --upgrade pip
quiet_pip "torch==2.13.0"
quiet_pip -e ".[$1]"
