#!/usr/bin/env bash
# Smoke test of a plain install: a fresh venv with the package and NO extras
# (pip install -c constraints.txt .), then every command once on a tiny real bundle.
# Fails on any exit code other than the one expected. Quick: a 1-epoch model on 1,000
# of scikit-learn's real digits. Run from CI after scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
PYTHON_BIN="${PYTHON_BIN:-python3.11}"
command -v "$PYTHON_BIN" >/dev/null 2>&1 || PYTHON_BIN=python3
work=$(mktemp -d "${TMPDIR:-/tmp}/verifier-smoke.XXXXXX")
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

step() { echo "smoke: $*" >&2; }
# expect "CODES" command...: run it, fail unless its exit code is one of CODES
expect() {
  local codes=$1 rc=0
  shift
  "$@" >"$work/last.out" 2>"$work/last.err" || rc=$?
  case " $codes " in
    *" $rc "*) step "ok (exit $rc): verifier $2" ;;
    *) echo "smoke: FAILED: '$*' exited $rc, expected one of [$codes]" >&2
       tail -20 "$work/last.out" "$work/last.err" >&2
       exit 1 ;;
  esac
}

step "fresh venv, package without extras"
"$PYTHON_BIN" -m venv "$work/venv"
if ! "$work/venv/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt "$repo" \
    >"$work/pip.log" 2>&1; then
  grep -v "^WARNING: Location" "$work/pip.log" >&2; exit 1
fi
PY="$work/venv/bin/python"
V="$work/venv/bin/verifier"
cd "$work"  # not the source tree: only the installed package is importable
for extra in mlxtend matplotlib pytest cryptography; do
  if "$PY" -c "import $extra" 2>/dev/null; then
    echo "smoke: '$extra' is installed without extras; the plain install is not plain" >&2; exit 1
  fi
done

step "tiny model and data"
mkdir -p site && "$PY" "$repo/scripts/smoke_data.py" site

expect "0" "$V" --help
expect "2" "$V" build --spec site/model.toml --data site/ref --out site/notes   # never over a user's folder
test -f site/notes/keep.txt
expect "0" "$V" build --spec site/model.toml --data site/ref --calibration site/cal --out bundle --sign-key site/key --json
expect "2" "$V" build --spec site/model.toml --data site/ref --calibration site/cal --out bundle
expect "0" "$V" verify bundle --key site/key --json
grep -q '"signature": {[^}]*"status": "verified"' "$work/last.out"
expect "0" "$V" gate --bundle bundle site/stream --json --log log --verify-key site/key
test "$(wc -l <"$work/last.out")" -eq 100
expect "0 1" "$V" audit --bundle bundle --spec site/model.toml --data site/cal --report audit.html --json audit.json
test -s audit.html
expect "0 1" "$V" drift --bundle bundle --log log --day "$(date -u +%F)" --report drift.html --json drift.json
test -s drift.html

expect "0" "$V" explain --spec site/model.toml --method gradcam,crm site/stream/3 --out explain --json --faithfulness
test -n "$(find explain -name '*.npy' | head -1)"

step "serve: health and one image"
port=$("$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$V" serve --bundle bundle --port "$port" --verify-key site/key 2>serve.err &
server_pid=$!
"$PY" - "$port" site/stream/3 "$work/serve.err" <<'PY'
import json, sys, time, urllib.error, urllib.request
from pathlib import Path
url = f"http://127.0.0.1:{sys.argv[1]}"
for _ in range(1200):
    try:
        if urllib.request.urlopen(url + "/health/ready", timeout=5).status == 200:
            break
    except (urllib.error.URLError, ConnectionError, OSError):
        time.sleep(0.1)
else:
    sys.exit("smoke: serve did not become ready: " + Path(sys.argv[3]).read_text())
png = sorted(Path(sys.argv[2]).glob("*.png"))[0]
req = urllib.request.Request(url + "/v1/gate", data=png.read_bytes(),
                             headers={"Content-Type": "image/png", "X-Filename": png.name})
d = json.load(urllib.request.urlopen(req, timeout=60))
assert d["decision"] in ("accept", "reject") and d["error"] is None and d["input"] == png.name, d
PY
kill "$server_pid"; wait "$server_pid" 2>/dev/null || true; server_pid=""
step "ok: serve"

step "tampering: alpha edited in manifest.json"
cp -r bundle tampered
"$PY" -c "import json,sys; p='tampered/manifest.json'; m=json.load(open(p)); m['alpha']=0.0001; json.dump(m, open(p,'w'))"
expect "1" "$V" verify tampered
expect "2" "$V" gate --bundle tampered site/stream/3
grep -q "field(s) alpha changed" "$work/last.err"
step "all commands ran as expected (${SECONDS}s)"
