#!/usr/bin/env bash
# The main job end to end, on the embedded default: a local server on SQLite,
# two real workspaces made from fixtures/sample, real syncs.
# Run through `make demo` (which sets up .venv first).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
RUN="${SYNCENGINE_DEMO_RUN:-$PWD/demo-run}"  # tests run it elsewhere
rm -rf "$RUN" && mkdir -p "$RUN"

say() { printf '\n\033[1;36m== %s\033[0m\n' "$*"; }
run() { printf '\033[2m$ %s\033[0m\n' "$*"; "$@"; }

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
URL="http://127.0.0.1:$PORT"

say "Start a sync server on SQLite ($URL)"
syncengine serve --port "$PORT" --data "$RUN/server" >"$RUN/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
python3 - "$URL" <<'PY'
import sys, time, urllib.request
for _ in range(200):
    try:
        urllib.request.urlopen(sys.argv[1] + "/v1/health", timeout=1); break
    except OSError:
        time.sleep(0.05)
PY
TOKEN_FILE="$RUN/token"
( umask 077; syncengine token create --workspace demo --data "$RUN/server" >"$TOKEN_FILE" )
echo "token stored in $TOKEN_FILE (never on the command line)"

say "Workspace A: the sample documents"
cp -r fixtures/sample "$RUN/A"
run syncengine init "$RUN/A" --server "$URL" --workspace demo --token-file "$TOKEN_FILE"
cd "$RUN/A"
run syncengine status

say "History without a server: snapshot, edit, diff, restore"
run syncengine snapshot -m "as imported"
python3 - <<'PY'
import json, pathlib
p = pathlib.Path("invoices/doc-002.json")
doc = json.loads(p.read_text())
doc["title"] = "Invoice 2 (checked)"
doc["zones"][1]["text"] = "corrected total"
p.write_text(json.dumps(doc, indent=2) + "\n")
PY
echo "- [ ] call the vendor" >> notes/todo.md
rm notes/meeting-2026-11-20.md
run syncengine diff
run syncengine restore latest notes/meeting-2026-11-20.md
run syncengine snapshots

say "Sync A to the server"
run syncengine sync

say "Workspace B: a fresh, empty folder, synced from the server"
run syncengine init "$RUN/B" --server "$URL" --workspace demo --token-file "$TOKEN_FILE"
cd "$RUN/B"
run syncengine sync
diff -r --exclude=.syncengine "$RUN/A" "$RUN/B" && echo "A and B hold the same files"

say "Concurrent edits: different zones of one document in A and B"
python3 - <<'PY'
import json, pathlib
p = pathlib.Path("invoices/doc-002.json")
doc = json.loads(p.read_text()); doc["zones"][0]["label"] = "letterhead"
p.write_text(json.dumps(doc, indent=2) + "\n")
PY
(cd "$RUN/A" && python3 - <<'PY'
import json, pathlib
p = pathlib.Path("invoices/doc-002.json")
doc = json.loads(p.read_text()); doc["meta"]["updated_at"] = "2026-11-25"
p.write_text(json.dumps(doc, indent=2) + "\n")
PY
)
echo "B renames a note too" && mv notes/todo.md notes/todo-2026.md
run syncengine sync
cd "$RUN/A"
run syncengine sync
python3 -c 'import json; d=json.load(open("invoices/doc-002.json")); print("merged in A:", d["zones"][0]["label"], d["meta"]["updated_at"])'

say "B pulls the merge"
cd "$RUN/B"
run syncengine sync

say "Status and log on both sides"
for side in A B; do
  cd "$RUN/$side"
  run syncengine status
  run syncengine log -n 5
done
diff -r --exclude=.syncengine "$RUN/A" "$RUN/B" && echo "A and B converged"
say "Done. Everything is in $RUN; the server is stopped on exit."
