#!/usr/bin/env bash
# Install edgetune's device-side evaluator on a board over SSH, then print its `info`.
# The layout matches tasks/devices/ssh.py (RemoteLayout): WORK_DIR/evaluator/VERSION/.
set -euo pipefail

PROG=$(basename "$0")
HERE=$(cd "$(dirname "$0")" && pwd)
EVALUATOR="$HERE/../../tasks/devices/edgetune_eval.py"

usage() {
    cat <<EOF
usage: $PROG [-p PORT] [-i KEY] [-d WORK_DIR] [--python PYTHON] [--no-deps] [-o SSH_OPTION]... USER@HOST

Copy tasks/devices/edgetune_eval.py to WORK_DIR/evaluator/<version>/ on the board (the
place the ssh device runner looks for it), install numpy + onnxruntime there with
'PYTHON -m pip install --user' (plain 'pip install' inside a virtual environment), then
run the evaluator's 'info' on the board and print it.

  -p PORT          SSH port (default 22)
  -i KEY           private key file (as device.ssh.key_file)
  -d WORK_DIR      work dir on the board: absolute, or relative to the remote home
                   (default: edgetune; as device.ssh.work_dir)
  --python PYTHON  Python on the board (default: python3; as device.ssh.python)
  --no-deps        do not install numpy / onnxruntime
  -o SSH_OPTION    extra ssh option, e.g. -o UserKnownHostsFile=FILE (repeatable)
  -h, --help       this text

The board's host key must already be in known_hosts (no prompt is shown):
  ssh-keyscan -p PORT HOST >> ~/.ssh/known_hosts
On a Hailo board, HailoRT and its Python bindings (hailo_platform) come from Hailo's own
packages (Raspberry Pi: sudo apt install hailo-all; otherwise the Hailo Developer Zone),
not from pip. Where pip refuses --user installs into the system Python (PEP 668, e.g.
Raspberry Pi OS 12), create a venv on the board (python3 -m venv --system-site-packages
~/edgetune-venv) and pass --python ~/edgetune-venv/bin/python3, and set device.ssh.python
to the same path.
EOF
}

die() {
    echo "$PROG: error: $*" >&2
    exit 1
}

bad_usage() {
    echo "$PROG: error: $*" >&2
    usage >&2
    exit 2
}

# Quote one word for a POSIX shell on the board.
q() {
    printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"
}

# The remote Python: a leading ~/ expands to the remote home, the rest is quoted.
remote_python() {
    case "$1" in
        "~/"*) printf '"$HOME"/%s' "$(q "${1#\~/}")" ;;
        *) q "$1" ;;
    esac
}

PORT=22
KEY=
WORK_DIR=edgetune
PYTHON=python3
DEPS=1
SSH_OPTS=()
TARGET=

while [ $# -gt 0 ]; do
    case "$1" in
        -p) [ $# -ge 2 ] || bad_usage "-p needs a port"; PORT=$2; shift 2 ;;
        -i) [ $# -ge 2 ] || bad_usage "-i needs a key file"; KEY=$2; shift 2 ;;
        -d) [ $# -ge 2 ] || bad_usage "-d needs a work dir"; WORK_DIR=$2; shift 2 ;;
        -o) [ $# -ge 2 ] || bad_usage "-o needs an ssh option"; SSH_OPTS+=(-o "$2"); shift 2 ;;
        --python) [ $# -ge 2 ] || bad_usage "--python needs a path"; PYTHON=$2; shift 2 ;;
        --python=*) PYTHON=${1#--python=}; shift ;;
        --no-deps) DEPS=0; shift ;;
        -h | --help) usage; exit 0 ;;
        -*) bad_usage "unknown option $1" ;;
        *)
            [ -z "$TARGET" ] || bad_usage "one USER@HOST only (got $TARGET and $1)"
            TARGET=$1
            shift
            ;;
    esac
done

[ -n "$TARGET" ] || bad_usage "USER@HOST is missing"
case "$TARGET" in
    ?*@?*) ;;
    *) bad_usage "expected USER@HOST, got '$TARGET'" ;;
esac
case "$PORT" in
    '' | *[!0-9]*) bad_usage "port '$PORT' is not a number" ;;
esac
[ -n "$PYTHON" ] || bad_usage "--python is empty"
# The same rule as tasks/devices/ssh.py check_work_dir: inside the home or absolute, no '..'.
case "$WORK_DIR" in
    "~") WORK_DIR=. ;;
    "~/"*) WORK_DIR=${WORK_DIR#\~/} ;;
esac
case "/$WORK_DIR/" in
    */../*) bad_usage "work dir '$WORK_DIR' contains '..'" ;;
esac
case "$WORK_DIR" in
    '' | -* | "~"*) bad_usage "work dir '$WORK_DIR' must be a plain relative or absolute path" ;;
esac
WORK_DIR=${WORK_DIR%/}
[ -n "$WORK_DIR" ] || WORK_DIR=/
[ -z "$KEY" ] || [ -f "$KEY" ] || die "key file $KEY does not exist"
[ -f "$EVALUATOR" ] || die "cannot find the evaluator at $EVALUATOR"

VERSION=$(sed -n 's/^__version__ = "\([^"]*\)".*$/\1/p' "$EVALUATOR")
[ -n "$VERSION" ] || die "no __version__ = \"...\" line in $EVALUATOR"
DEST_DIR="$WORK_DIR/evaluator/$VERSION"
DEST="$DEST_DIR/edgetune_eval.py"
PY=$(remote_python "$PYTHON")

SSH=(ssh -p "$PORT" -o BatchMode=yes -o ConnectTimeout=15)
[ -z "$KEY" ] || SSH+=(-i "$KEY" -o IdentitiesOnly=yes)
SSH+=("${SSH_OPTS[@]}" "$TARGET")

# Upload to a temporary name, then rename: a half copy never counts.
PARTIAL="$DEST_DIR/.edgetune_eval.py.$$.part"
if ! "${SSH[@]}" "umask 022 && mkdir -p $(q "$DEST_DIR") && cat > $(q "$PARTIAL") && mv -f $(q "$PARTIAL") $(q "$DEST")" <"$EVALUATOR"; then
    die "could not copy the evaluator to $TARGET:$DEST (port $PORT); check that 'ssh -p $PORT $TARGET true' works"
fi
echo "$PROG: installed evaluator $VERSION at $TARGET:$DEST" >&2

if [ "$DEPS" = 1 ]; then
    # --user into the system Python; a plain install inside a virtual environment.
    INSTALL="if $PY -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then USER_FLAG=; else USER_FLAG=--user; fi; $PY -m pip install \$USER_FLAG --upgrade numpy onnxruntime"
    "${SSH[@]}" "$INSTALL" </dev/null ||
        die "could not install numpy + onnxruntime with $PYTHON on $TARGET (exit $?; pip's output is above; --help covers PEP 668 boards)"
fi

status=0
"${SSH[@]}" "$PY $(q "$DEST") info" </dev/null || status=$?
case "$status" in
    0) ;;
    3) die "the evaluator runs on $TARGET but a runtime is missing for $PYTHON (exit 3; see above)" ;;
    127) die "$PYTHON not found on $TARGET (exit 127); pass --python" ;;
    *) die "the evaluator's info failed on $TARGET with $PYTHON (exit $status; see above)" ;;
esac
